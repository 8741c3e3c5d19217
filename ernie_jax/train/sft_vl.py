"""The VL parts of supervised fine-tuning (`ernie_jax.train.sft.FineTuning` with model_family="vl").

The recipe is the text one -- same loop, jitted step, LoRA / parameter groups, checkpoints, evaluation -- with:
* data: chats with images (`ernie_jax.data.vl_chat`): rows with token types, (t, h, w) positions and a fixed number
  of image slots, trained by the `VisionLanguage` task (`ernie_jax.train.tasks`: token-balanced LM loss over the
  text targets -- the assistant tokens here --, per-modality router losses, both correction-bias rows);
* start-up: the image layout and, for the embedded shapes chats, the text-only bound (the least held-out assistant
  loss without looking at the images, `vl_chat.text_only_bound`);
* the sample at the end: the first held-out conversation's first question with its image(s), answered greedily by
  `ernie_jax.infer.generate_vl` (`finetune.sample_prompt` replaces the question's text, the images stay).
"""

from __future__ import annotations

import numpy as np

from ernie_jax.data.chat_template import answer_stop_ids
from ernie_jax.data.vl_chat import (first_heldout_prompt, flatten, load_vl_chat_tokenizer, make_vl_chat_eval_batches,
                                    make_vl_chat_pipeline, text_only_bound)
from ernie_jax.infer.generate_vl import generate_vl
from ernie_jax.parallel.sharding import batch_shards
from ernie_jax.train import trainer

load_tokenizer = load_vl_chat_tokenizer
eval_batches = make_vl_chat_eval_batches


def data(cfg, tokenizer, model_cfg):
  """(training pipeline: this process's data shards, run_info fields, start-up line) of a VL SFT run."""
  pipeline = trainer.shard_data(cfg, lambda i, n, rows: make_vl_chat_pipeline(
    cfg.data, tokenizer, model_cfg, batch_size=rows, shard_index=i, shard_count=n))
  d = cfg.data
  tokens = pipeline.first.renderer.image_tokens
  info = {"image_tokens": tokens}
  line = (f"images: {d.image_size} x {d.image_size} px -> {tokens} tokens each, {d.images_per_row} image slots per "
          f"row, template {pipeline.first.template}")
  bound = text_only_bound(d, tokenizer, model_cfg)
  if bound is not None:
    info["text_only_bound"] = bound
    line += f"; text-only bound {bound:.3f} nats per held-out assistant token"
  return pipeline, info, line


def sample(cfg, setup, model, model_cfg) -> tuple[str, str, str] | None:
  """(question as text, greedy answer, the data's answer) for the first held-out image question; None if none."""
  prompt = first_heldout_prompt(cfg.data, setup.tokenizer, model_cfg, cfg.finetune.sample_prompt)
  if prompt is None:
    return None
  tok = setup.tokenizer
  stops = answer_stop_ids(tok, setup.eos_id)
  copies = batch_shards(model.sharding_rules)  # the prompt once per batch shard of the mesh (rows must divide)
  out = generate_vl(model, [prompt.ids.tolist()] * copies, max_new_tokens=cfg.finetune.sample_tokens,
                    pixel_values=np.concatenate([prompt.pixel_values] * copies),
                    image_grid_thw=prompt.image_grid_thw * copies, stop_tokens=stops)[0]
  answer = tok.decode([t for t in out if t not in stops])
  shown = flatten(prompt.messages, lambda i: f"<image {i}>")[-1]["content"]
  return shown, answer, prompt.answer

