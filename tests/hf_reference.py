"""Golden references: tiny random transformers ERNIE 4.5 models, saved with `save_pretrained`.

Weights are re-drawn with scales that keep activations O(1) (the default 0.02 init makes logits
nearly constant, which would let wrong routing or RoPE slip through), norm weights get noise and
the MoE correction bias gets random non-zero values.
"""

from __future__ import annotations

import math

import numpy as np
import torch

DENSE_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=24)
MOE_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_num_experts=8,
                moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1, moe_layer_start_index=1)


def randomize(model: torch.nn.Module, seed: int, bias_scale: float = 0.05) -> None:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("e_score_correction_bias"):
        p.copy_(torch.randn(p.shape, generator=g) * bias_scale)
      elif p.ndim == 1:  # norm weights
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=g))
      elif name.endswith("mlp.gate.weight"):  # router: sharp enough to prefer some experts
        p.copy_(torch.randn(p.shape, generator=g) * 2.0 / math.sqrt(p.shape[-1]))
      else:
        fan_in = p.shape[-1]
        p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    for name, buf in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        buf.copy_(torch.randn(buf.shape, generator=g) * bias_scale)


def build(kind: str, seed: int = 0, dtype=torch.float32, **overrides):
  """A random transformers ERNIE 4.5 model ('dense' or 'moe') in eval mode."""
  import transformers

  if kind == "dense":
    cfg = transformers.Ernie4_5Config(**{**DENSE_BASE, **overrides})
    model = transformers.Ernie4_5ForCausalLM(cfg)
  else:
    cfg = transformers.Ernie4_5_MoeConfig(**{**MOE_BASE, **overrides})
    model = transformers.Ernie4_5_MoeForCausalLM(cfg)
  randomize(model, seed)
  if not cfg.tie_word_embeddings:
    # an untied head must differ from the embedding for the test to mean anything
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
  return model.to(dtype).eval()


def save(model, directory, **kwargs) -> str:
  model.save_pretrained(str(directory), **kwargs)
  return str(directory)


def logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def random_tokens(vocab: int, shape, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(3, vocab, size=shape).astype(np.int32)
