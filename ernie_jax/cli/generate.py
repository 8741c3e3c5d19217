"""Command-line text generation with an ERNIE 4.5 checkpoint (or a tiny random model, --demo).

Examples:
  python -m ernie_jax.cli.generate --demo
  python -m ernie_jax.cli.generate --checkpoint ckpt/ --tokens "1 2 3" --tokens "4 5" --max-new-tokens 16
  python -m ernie_jax.cli.generate --checkpoint ckpt/ --prompt "Hello" --temperature 0.7 --top-p 0.9
  python -m ernie_jax.cli.generate --checkpoint runs/tiny --prompt "def f(" --max-new-tokens 64
  python -m ernie_jax.cli.generate --checkpoint /tmp/ernie_jax/sft_tiny --chat "What does \`len\` do?"
  python -m ernie_jax.cli.generate --checkpoint ERNIE-4.5-0.3B-PT --adapter my_peft_adapter --chat "Hi"

The argument parsing and the I/O; the decoding itself is `ernie_jax.infer.generate.generate`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
from flax import nnx

from ernie_jax.config import ModelConfig
from ernie_jax.data.chat_template import ChatTemplateError, answer_stop_ids, render_prompt
from ernie_jax.data.tokenizers import TokenizerError, find_tokenizer_file, get_tokenizer, load_tokenizer
from ernie_jax.infer.generate import generate
from ernie_jax.infer.generate_vl import generate_vl
from ernie_jax.interop import orbax_io
from ernie_jax.interop.peft import load_peft_adapter
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.loading import from_pretrained
from ernie_jax.model import ErnieForCausalLM
from ernie_jax.train.checkpoint import Checkpointer
from ernie_jax.train.trained import load_trained

DESCRIPTION = """\
Generate tokens with an ERNIE 4.5 model (batched, KV-cached, one jitted program per shape).

--checkpoint takes a Hugging Face or Paddle checkpoint directory, an ernie_jax Orbax checkpoint
(converted, or a training checkpoint), or a training workdir (experiments/pretrain.py or sft.py): its
latest checkpoint under WORKDIR/checkpoints/ is loaded (a LoRA run: its base with the trained
adapters), with the tokenizer the run trained with. --adapter applies a peft LoRA adapter directory.
An ERNIE 4.5 VL checkpoint generates from text-only prompts here (images: `ernie_jax.infer.generate_vl`).

Prompts are given as token ids (--tokens, repeatable) or as text (--prompt, repeatable; needs a
tokenizer: --tokenizer, a tokenizer.model / tokenizer.json in the checkpoint directory, or the
pretraining workdir's tokenizer; --tokenizer bytes for byte-level models).
Prompts of different lengths are decoded together in one batch. For each prompt the new token ids
are printed (and the decoded text when a tokenizer is available). Generation of a prompt stops
after the first stop token (default: the config's eos id), which is printed too. --chat TEXT (repeatable)
sends TEXT as a user message rendered with the chat template (the tokenizer directory's own, else the
built-in ERNIE 4.5 one; --system adds a system message); it also stops at <|end_of_sentence|>.

--demo needs no files: it builds a tiny random MoE model and reports throughput."""


def _parse_ids(text: str) -> list[int]:
  try:
    return [int(t) for t in text.replace(",", " ").split()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--tokens expects integers separated by spaces or commas, "
                                     f"got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m ernie_jax.cli.generate", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_argument_group("model")
  src.add_argument("--checkpoint", metavar="DIR",
                   help="checkpoint directory: Hugging Face / Paddle (config.json + weights), an ernie_jax Orbax "
                        "checkpoint, or a pretraining workdir (its latest checkpoint and tokenizer)")
  src.add_argument("--demo", action="store_true",
                   help="use a tiny random MoE model (ModelConfig.tiny_moe); no files needed. "
                        "Stop tokens are off unless --stop-token is given")
  src.add_argument("--adapter", metavar="DIR",
                   help="a peft LoRA adapter directory (adapter_config.json + adapter_model.safetensors) to apply")
  src.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter and compute dtype (default: %(default)s)")
  src.add_argument("--moe-impl", choices=("auto", "ragged_dot", "blocked", "loop"), default="auto",
                   help="grouped-matmul implementation for MoE layers (default: %(default)s)")
  inp = p.add_argument_group("prompts")
  inp.add_argument("--tokens", action="append", type=_parse_ids, default=[], metavar='"ID ID ..."',
                   help='a prompt as token ids, e.g. --tokens "1 2 3"; repeat for a batch')
  inp.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt as text (needs a tokenizer); repeat for a batch")
  inp.add_argument("--chat", action="append", default=[], metavar="TEXT",
                   help="a user message, rendered with the chat template (repeatable; needs a tokenizer)")
  inp.add_argument("--system", default="", metavar="TEXT", help="a system message for --chat")
  inp.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.model / tokenizer.json, a directory with one, or 'bytes' (UTF-8 bytes + 3, "
                        "the byte-level pretraining tokenizer) (default: look in --checkpoint, or the "
                        "tokenizer a pretraining workdir trained with)")
  inp.add_argument("--add-bos", action="store_true",
                   help="prepend the BOS token to text prompts (ERNIE adds none by default)")
  gen = p.add_argument_group("generation")
  gen.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="new tokens per prompt at most (default: %(default)s)")
  gen.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 = greedy (default: %(default)s)")
  gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
  gen.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: keep the smallest set with this probability mass; 1 = off")
  gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
  gen.add_argument("--stop-token", type=int, action="append", default=None, metavar="ID",
                   help="token id that ends a prompt's generation (repeatable; default: eos id)")
  gen.add_argument("--ignore-eos", action="store_true",
                   help="never stop early: always generate --max-new-tokens tokens")
  gen.add_argument("--max-len", type=int, default=None,
                   help="KV-cache length (default: longest prompt + max-new-tokens, rounded up)")
  out = p.add_argument_group("output")
  out.add_argument("--json", action="store_true", help="print one JSON object per prompt")
  return p


def _workdir_checkpoints(path: str | None) -> str | None:
  """`path`/checkpoints when `path` is a pretraining workdir, else None."""
  if not path:
    return None
  ckpts = os.path.join(path, "checkpoints")
  return ckpts if os.path.isdir(ckpts) and not orbax_io.looks_like_orbax(path) else None


def _workdir_tokenizer(workdir: str, ckpts: str):
  """The tokenizer a training run trained with: data.tokenizer recorded in its latest checkpoint
  ("bytes", "bpe" = WORKDIR/tokenizer.json, or a path); None for pre-tokenized data."""
  step = int(os.path.basename(orbax_io.resolve(ckpts)))
  ckpt = Checkpointer(workdir, every_steps=0, keep=None, async_save=False)
  try:
    config = ckpt.read_json(step, "meta").get("config", {})
  finally:
    ckpt.close()
  data = config.get("data", {})
  if data.get("source") == "tokens" or not data.get("tokenizer"):
    return None
  return get_tokenizer(data["tokenizer"], workdir=workdir)


def _load_tokenizer(args):
  """--tokenizer, else one in the checkpoint directory, else a pretraining workdir's (None if none)."""
  if args.tokenizer == "bytes":
    return get_tokenizer("bytes")
  if args.tokenizer:
    return load_tokenizer(args.tokenizer)
  if not args.checkpoint:
    return None
  found = find_tokenizer_file(args.checkpoint)
  if found:
    return load_tokenizer(found)
  ckpts = _workdir_checkpoints(args.checkpoint)
  return _workdir_tokenizer(args.checkpoint, ckpts) if ckpts else None


def _load_model(args):
  if args.demo:
    # Random weights with a large init scale, so the (meaningless) output is not just the
    # prompt's last token repeated, as it is with tied embeddings at the usual 0.02.
    cfg = ModelConfig.tiny_moe(dtype=args.dtype, param_dtype=args.dtype, moe_impl=args.moe_impl,
                               initializer_range=0.3)
    return ErnieForCausalLM(cfg, rngs=nnx.Rngs(0))
  if _workdir_checkpoints(args.checkpoint):  # a training workdir (LoRA runs: base + adapters)
    model = load_trained(args.checkpoint).model
  else:
    model = from_pretrained(args.checkpoint, dtype=args.dtype, param_dtype=args.dtype, moe_impl=args.moe_impl)
  if args.adapter:
    model = load_peft_adapter(model, args.adapter)
  return model


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.demo == bool(args.checkpoint):
    parser.error("give exactly one of --checkpoint DIR or --demo")
  if args.max_new_tokens < 0:
    parser.error("--max-new-tokens must be >= 0")

  try:
    tok = _load_tokenizer(args)
  except (TokenizerError, CheckpointError) as e:
    if args.prompt or args.tokenizer:
      print(f"error: {e}", file=sys.stderr)
      return 1
    tok = None  # only used to show text next to --tokens
  if tok is None and (args.prompt or args.chat):
    parser.error(f"{'--prompt' if args.prompt else '--chat'} needs a tokenizer: pass --tokenizer PATH or "
                 "--tokenizer bytes (no tokenizer.model or tokenizer.json in the checkpoint directory)")

  prompts = [list(t) for t in args.tokens]
  if args.prompt:
    prompts += [tok.encode(text, add_bos=args.add_bos) for text in args.prompt]
  system = [{"role": "system", "content": args.system}] if args.system else []
  try:
    prompts += [render_prompt(system + [{"role": "user", "content": text}], tok).tolist() for text in args.chat]
  except ChatTemplateError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if not prompts:
    if not args.demo:
      parser.error("give at least one prompt: --tokens \"ID ID ...\" or --prompt TEXT")
    prompts = [[1, 17, 42, 99], [5, 6, 7], [200, 31, 9, 12, 77, 3, 150]]

  try:
    model = _load_model(args)
    cfg = model.config
    if args.ignore_eos:
      stops = ()
    elif args.stop_token is not None:
      stops = tuple(args.stop_token)
    else:
      stops = () if args.demo else None  # None = the config's eos id
      if args.chat and tok is not None:  # a chat answer ends with <|end_of_sentence|>
        stops = answer_stop_ids(tok, cfg.eos_token_id)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, stop_tokens=stops, seed=args.seed, max_len=args.max_len)
    run = generate_vl if cfg.is_vl else generate  # VL checkpoints: text-only prompts
    t0 = time.perf_counter()
    outs = run(model, prompts, **kw)
    first_s = time.perf_counter() - t0
    steady_s = None
    if args.demo:  # second call reuses the compiled program: steady-state throughput
      t0 = time.perf_counter()
      outs = run(model, prompts, **kw)
      steady_s = time.perf_counter() - t0
  except (ValueError, OSError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1

  for i, (p, o) in enumerate(zip(prompts, outs)):
    text = tok.decode(o) if tok is not None else None
    if args.json:
      rec = {"index": i, "prompt_ids": p, "output_ids": o}
      if text is not None:
        rec["text"] = text
      print(json.dumps(rec))
    else:
      print(f"[{i}] prompt ids: {' '.join(map(str, p))}")
      print(f"[{i}] output ids: {' '.join(map(str, o))}")
      if text is not None:
        print(f"[{i}] text: {text!r}")
  n_new = sum(len(o) for o in outs)
  stats = (f"{len(prompts)} prompts, {n_new} new tokens; first call (with compile) {first_s:.2f} s")
  if steady_s is not None:
    stats += f"; steady state {steady_s * 1e3:.1f} ms = {n_new / max(steady_s, 1e-9):.1f} tokens/s"
  stats += f" [{jax.default_backend()}, {cfg.dtype}, {'MoE' if cfg.is_moe else 'dense'}]"
  print(stats, file=sys.stderr if args.json else sys.stdout)
  return 0


if __name__ == "__main__":
  sys.exit(main())
