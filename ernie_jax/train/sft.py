"""Supervised fine-tuning: the `FineTuning` recipe of the shared training loop
(`ernie_jax.train.trainer`), used by `experiments/sft.py`.

What it changes against pretraining:
* data: chat conversations rendered with the ERNIE 4.5 chat template, loss on assistant tokens only
  (`ernie_jax.data.sft`), packed into the same rows as pretraining, so the objective is the text
  task (`TextLM`) unchanged;
* model: the base comes from `run.init_from` (HF / Paddle / Orbax), or is randomly initialised from
  `model` (the tiny demo); with `finetune.method="lora"` LoRA adapters are added
  (`ernie_jax.model.lora`) and only they train;
* optimizer: parameter groups (`ernie_jax.train.param_groups`): frozen routers / vision tower, their
  learning-rate ratios, LoRA+;
* checkpoints of a LoRA run hold only what changes (adapters, buffers such as the MoE correction bias,
  optimizer, step, RNG) and name their base by path and content fingerprint (`fingerprint`, a hash of
  every base parameter's bits); resuming against another base is a `CheckpointError`;
* evaluation: the held-out assistant loss (`eval_loss`) at the start, every `finetune.eval_every`
  steps and at the end; after the last step one greedy sample answer is printed;
* ERNIE 4.5 VL (model_family="vl"): chats with images and the `VisionLanguage` task
  (`ernie_jax.train.sft_vl`), through the same step, checkpoints and evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax import model as model_lib
from ernie_jax.config import LoraConfig
from ernie_jax.data import stdlib_qa
from ernie_jax.data.chat_template import answer_stop_ids, render_prompt
from ernie_jax.data.sft import describe_heldout, load_chat_tokenizer, make_chat_eval_batches, make_chat_pipeline
from ernie_jax.infer.generate import generate
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.loading import from_pretrained
from ernie_jax.model.lora import apply_lora
from ernie_jax.train import sft_vl, trainer
from ernie_jax.train.config import TrainConfigError
from ernie_jax.train.losses import head_loss_sum
from ernie_jax.train.param_groups import make_grouped_optimizer, trained_filter
from ernie_jax.train.sft_config import parse_sft
from ernie_jax.train.step import batch_sharding, put_global_batch

# data fields that do not change the sequence of batches
_NOT_STREAM = ("bad_rows", "eval_paths", "eval_fraction")


@dataclasses.dataclass(frozen=True)
class AddLora:
  """`adapt` of the train state: LoRA adapters on a freshly built model (hashable, so the jitted
  state builder is cached)."""

  cfg: LoraConfig
  seed: int

  def __call__(self, model):
    return apply_lora(model, self.cfg, rngs=nnx.Rngs(self.seed + 1))


def fingerprint(model_or_state) -> str:
  """A content hash of the Params of a model (or an nnx.State): sha256 over each parameter's path,
  shape, dtype and a position-weighted checksum of its bits (computed on device, one pass)."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
  flat = sorted(((".".join(map(str, p)), v) for p, v in nnx.to_flat_state(state)), key=lambda kv: kv[0])
  arrays = [v.get_value() if hasattr(v, "get_value") else v[...] for _, v in flat]
  sums = jax.device_get(_checksums(arrays))
  h = hashlib.sha256()
  for (path, _), a, s in zip(flat, arrays, sums):
    h.update(f"{path}:{tuple(a.shape)}:{a.dtype}:{int(s[0])}:{int(s[1])};".encode())
  return h.hexdigest()


@jax.jit
def _checksums(arrays):
  out = []
  for a in arrays:
    a = a.reshape(-1)
    bits = jax.lax.bitcast_convert_type(a.astype(jnp.float32) if a.dtype.itemsize != 4 else a, jnp.uint32)
    idx = jnp.arange(bits.shape[0], dtype=jnp.uint32)
    out.append(jnp.stack([jnp.sum(bits), jnp.sum(bits * (idx * jnp.uint32(2654435761) + jnp.uint32(1)))]))
  return out


def is_frozen_base(path, v) -> bool:
  """A frozen base parameter of a LoRA train state (under `model`, a Param but not a LoRAParam)."""
  return bool(path) and path[0] == "model" and isinstance(v, nnx.Param) and not isinstance(v, nnx.LoRAParam)


class FineTuning(trainer.Pretraining):
  name = "sft"

  def __init__(self):
    self.base_fingerprint = None
    self.eval_data = None  # the held-out split's counts (`note_heldout`)
    self.model_cfg = None  # the run's model config (set by `model_config`)

  def parse(self, config):
    return parse_sft(config)

  def tokenizer(self, cfg, workdir):
    if cfg.run.model_family == "vl":
      return sft_vl.load_tokenizer(cfg.data, workdir)
    return load_chat_tokenizer(cfg.data, workdir)

  def model_config(self, cfg, ckpt, latest, mesh):
    if cfg.finetune.method != "lora":
      model_cfg, model = trainer.model_config(cfg, ckpt, latest, mesh)
    else:  # LoRA: checkpoints hold no base, so the base is always loaded (or rebuilt from the seed)
      base = self.load_base(cfg, mesh)
      model_cfg, model = base.config, AddLora(cfg.lora, cfg.run.seed)(base)
    if model_cfg.is_vl != (cfg.run.model_family == "vl"):
      raise TrainConfigError("model_family", f"run.init_from={cfg.run.init_from!r} is "
                             f"{'a VL' if model_cfg.is_vl else 'a text'} model but model_family="
                             f"{cfg.run.model_family!r}; set --config.model_family={'vl' if model_cfg.is_vl else 'text'}"
                             " (and its data section)")
    self.model_cfg = model_cfg
    return model_cfg, model

  def load_base(self, cfg, mesh):
    """The base model: `run.init_from` (with the config's runtime fields), else `model` initialised from
    `run.seed` (the same values as a fresh train state's); records its fingerprint."""
    runtime = {k: getattr(cfg.model, k) for k in trainer.RUNTIME_FIELDS}
    if cfg.run.init_from:
      base = from_pretrained(cfg.run.init_from, mesh=mesh, **runtime)
    else:
      with jax.set_mesh(mesh):
        base = model_lib.model_class(cfg.model)(cfg.model, rngs=nnx.Rngs(cfg.run.seed))
    self.base_fingerprint = fingerprint(base)
    return base

  def setup(self, cfg, tokenizer, model_cfg):
    eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else model_cfg.eos_token_id
    trainer.check_vocab(cfg.data, tokenizer, model_cfg, eos_id)
    info = {"tokenizer": getattr(tokenizer, "path", "") or tokenizer.kind, "finetune": cfg.finetune.method,
            "base_fingerprint": self.base_fingerprint}
    what = ("LoRA " + f"rank {cfg.lora.rank}, targets {','.join(cfg.lora.targets)}"
            if cfg.finetune.method == "lora" else "full fine-tuning")
    embedded = "embedded shapes chats" if model_cfg.is_vl else "embedded stdlib Q&A"
    lines = [f"data: {cfg.data.paths or embedded}, tokenizer {info['tokenizer']}, "
             f"{cfg.run.global_batch_size * cfg.data.seq_len} tokens/step; {what}"]
    if model_cfg.is_vl:
      data, vl_info, line = sft_vl.data(cfg, tokenizer, model_cfg)
      info.update(vl_info)
      lines.append(line)
    else:
      data = trainer.shard_data(cfg, lambda i, n, rows: make_chat_pipeline(cfg.data, tokenizer, batch_size=rows,
                                                                           shard_index=i, shard_count=n))
    return trainer.Setup(data, eos_id, info, lines, tokenizer)

  def optimizer(self, cfg, model_cfg):
    return make_grouped_optimizer(cfg.optim, cfg.groups, cfg.run.steps, cfg.finetune.lora_plus_ratio)

  def wrt(self, cfg, model_cfg):
    return trained_filter(cfg.finetune.method, cfg.groups)

  def adapt(self, cfg, model_cfg):
    return AddLora(cfg.lora, cfg.run.seed) if cfg.finetune.method == "lora" else None

  def saved(self, cfg, state):
    if cfg.finetune.method != "lora":
      return state
    _, changing = nnx.split_state(state, is_frozen_base, ...)
    return changing

  def restore(self, cfg, base_state, restored):
    if cfg.finetune.method != "lora":
      return restored
    base, _ = nnx.split_state(base_state, is_frozen_base, ...)
    return nnx.merge_state(base, restored)

  def meta(self, cfg):
    return {"base": {"init_from": cfg.run.init_from, "fingerprint": self.base_fingerprint}}

  def check_resume(self, cfg, meta, ckpt):
    saved = (meta.get("base") or {}).get("fingerprint")
    if cfg.finetune.method == "lora" and saved != self.base_fingerprint:
      was = (meta.get("base") or {}).get("init_from") or "a random initialisation"
      now = cfg.run.init_from or "a random initialisation"
      raise CheckpointError(f"{ckpt.directory} holds LoRA adapters trained on another base model ({was}, "
                            f"fingerprint {str(saved)[:12]}) than run.init_from ({now}, fingerprint "
                            f"{str(self.base_fingerprint)[:12]}); use that base or a new workdir")

  def data_stream(self, cfg):
    d = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in _NOT_STREAM}
    return {**d, **trainer.batch_stream(cfg)}

  @staticmethod
  def micro_rows(cfg) -> int:
    """The rows of one micro-batch over all processes (the batch size of evaluation / reference passes; each process
    places its slice, `put_global_batch`)."""
    return cfg.run.global_batch_size // cfg.run.grad_accum_steps

  def evaluate_every(self, cfg):
    return cfg.finetune.eval_every

  def evaluator(self, cfg, setup, graphdef, mesh):
    micro = self.micro_rows(cfg)
    model_cfg, stats = self.model_cfg, {}
    if model_cfg.is_vl:
      batches = sft_vl.eval_batches(cfg.data, setup.tokenizer, model_cfg, batch_size=micro, stats=stats)
    else:
      batches = make_chat_eval_batches(cfg.data, setup.tokenizer, batch_size=micro, stats=stats)
    self.note_heldout(cfg, setup, stats)
    if cfg.finetune.eval_batches:
      batches = batches[:cfg.finetune.eval_batches]
    if not batches:
      return None
    sharding = batch_sharding(mesh)
    task = self.task(cfg, model_cfg)  # (its forward pass and LM-loss mask: the VL rows' images, text targets)

    @jax.jit
    def sums(state, batch):
      model = nnx.merge(graphdef, state).model
      out = task.forward(model, batch)
      return head_loss_sum(model, out.hidden, batch["targets"], task.lm_mask(batch, model_cfg), task.loss.lm_chunk)

    placed = [put_global_batch(b, sharding) for b in batches]

    def evaluate(state) -> dict[str, float]:
      parts = [sums(state, b) for b in placed]  # dispatched back to back; one transfer at the end
      total, count = (float(sum(np.asarray(x, np.float64) for x in xs)) for xs in zip(*jax.device_get(parts)))
      return {"eval_loss": total / max(count, 1.0), "eval_tokens": count}

    return evaluate

  def note_heldout(self, cfg, setup, stats: dict, what: str = "conversations") -> None:
    """Checks the held-out split (an error when nothing in it can be evaluated) and adds its start-up line and
    its counts (`summary["eval_data"]`); nothing when there is no held-out split (`stats` empty)."""
    if not stats:
      return
    setup.lines.append(describe_heldout(cfg.data, stats, what))
    self.eval_data = dict(stats)

  def finish(self, cfg, setup, graphdef, state, summary, writer):
    counts = setup.data.stats  # this process's rows, and those truncated / dropped / skipped so far
    summary.update(train_data=dict(counts), **({"eval_data": self.eval_data} if self.eval_data else {}))
    writer.print(f"data: {counts['rows']} training rows; {counts['truncated']} truncated, {counts['dropped']} "
                 f"dropped, {counts['skipped']} skipped (data.seq_len={cfg.data.seq_len})")
    if not cfg.finetune.sample_tokens:
      return
    if self.model_cfg.is_vl:
      found = sft_vl.sample(cfg, setup, nnx.merge(graphdef, state).model, self.model_cfg)
      if found is not None:
        question, answer, expected = found
        writer.print(f"sample: User: {question}\n        Assistant: {answer}" +
                     (f"\n        (the data's answer: {expected})" if expected else ""))
        summary.update(sample_question=question, sample_answer=answer, sample_expected=expected)
      return
    tok = setup.tokenizer
    question = cfg.finetune.sample_prompt or self.sample_question(cfg)
    if not question:
      return
    ids = np.asarray(render_prompt([{"role": "user", "content": question}], tok, cfg.data.template))
    model = nnx.merge(graphdef, state).model
    stops = answer_stop_ids(tok, setup.eos_id)
    out = generate(model, [ids.tolist()], max_new_tokens=cfg.finetune.sample_tokens, stop_tokens=stops)[0]
    answer = tok.decode([t for t in out if t not in stops])
    writer.print(f"sample: User: {question}\n        Assistant: {answer}")
    summary.update(sample_question=question, sample_answer=answer)

  def sample_question(self, cfg) -> str:
    """The first user message of the training data (the embedded set's first question by default)."""
    if cfg.data.paths:
      return ""
    return next(m["content"] for m in stdlib_qa.conversations("train")[0] if m["role"] == "user")

