"""Export the model of a training workdir (pretraining, full or LoRA fine-tuning).

  python -m ernie_jax.cli.export --workdir /tmp/ernie_jax/sft_tiny --output out_hf              # HF safetensors
  python -m ernie_jax.cli.export --workdir W --output out_orbax --format orbax
  python -m ernie_jax.cli.export --workdir W --output adapter --format peft                     # LoRA runs
  python -m ernie_jax.cli.export --workdir W --output out_hf --step 200 --dtype bfloat16

`hf` and `orbax` write the merged model (LoRA folded into the base weights: W + scale * A.B) with the
run's tokenizer files and a generation_config.json next to it; `peft` writes a LoRA run's adapter as
peft's `adapter_config.json` + `adapter_model.safetensors` (load it with `PeftModel.from_pretrained`
on transformers' model of the base, or back here with `ernie_jax.interop.peft.load_peft_adapter`).
The output is written atomically (nothing half-written is left behind); errors are one line.
"""

from __future__ import annotations

import argparse
import sys

from ernie_jax.data.tokenizers import TokenizerError
from ernie_jax.interop.export import export_model
from ernie_jax.interop.peft import save_peft_adapter
from ernie_jax.interop.safetensors_io import CheckpointError
from ernie_jax.model.lora import lora_config, merge_lora
from ernie_jax.train.trained import load_trained

FORMATS = ("hf", "orbax", "peft")


def export(workdir: str, output: str, *, format: str = "hf", step: int | None = None, dtype: str = "auto",
           overwrite: bool = False) -> dict:
  """Export the workdir's model (see the module docstring); returns a report dict."""
  if format not in FORMATS:
    raise ValueError(f"--format must be one of {FORMATS}, got {format!r}")
  trained = load_trained(workdir, step)
  report = {"workdir": workdir, "step": trained.step, "kind": trained.kind, "format": format, "output": output}
  if format == "peft":
    if lora_config(trained.model) is None:
      raise CheckpointError(f"{workdir} is a {trained.kind} run: it has no LoRA adapter to export "
                            "(use --format hf or orbax)")
    if trained.moved_buffers:  # (a peft adapter holds LoRA weights only: the base's buffers would revert)
      more = f" and {len(trained.moved_buffers) - 1} more" if len(trained.moved_buffers) > 1 else ""
      raise CheckpointError(f"{workdir}: the run changed {trained.moved_buffers[0]}{more} (the MoE correction "
                            "bias of aux-loss-free balancing), which a peft adapter cannot carry: export the merged "
                            "model (--format hf or orbax), or train LoRA with --config.loss.bias_update_lr=0")
    report["adapter_config"] = save_peft_adapter(trained.model, output, base_model_name_or_path=trained.base,
                                                 overwrite=overwrite)
    return report
  model = merge_lora(trained.model) if lora_config(trained.model) is not None else trained.model
  report.update(export_model(model, output, format=format, dtype=dtype, tokenizer_dir=trained.tokenizer_dir,
                             overwrite=overwrite))
  return report


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a training workdir (experiments/pretrain.py or sft.py)")
  p.add_argument("--output", required=True, help="the directory to write")
  p.add_argument("--format", default="hf", choices=FORMATS)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--dtype", default="auto", help="parameter dtype written: auto | bfloat16 | float32 | float16")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
  args = p.parse_args(argv)
  try:
    report = export(args.workdir, args.output, format=args.format, step=args.step, dtype=args.dtype,
                    overwrite=args.overwrite)
  except (CheckpointError, TokenizerError, ValueError, FileExistsError, PermissionError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
  print(f"exported step {report['step']} of {args.workdir} ({report['kind']}) as {args.format} to {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
