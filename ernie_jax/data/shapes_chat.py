"""The embedded VL SFT dataset: conversations about the drawn shapes of `ernie_jax.data.vl.ShapeCaptions`.

No download and no files: conversation i of a split is drawn on demand from the seed (split seed, i), its images are
drawn by `ShapeCaptions` (one coloured shape -- 6 colours x 4 shapes -- in one of 4 quadrants of a black square;
image j of conversation i is element 2i + j, so the two splits never share an image). Rows are OpenAI / transformers
multimodal messages with in-memory PIL images: {"type": "image", "image": <PIL image>}, {"type": "text", ...}.
Kinds of conversation (drawn with these weights):
* 4: one image, one question: its colour ("Red."), shape ("A circle."), quadrant ("Top left.") or, half of the time,
  a description ("A red circle, top left.");
* 3: one image, two or three different one-attribute questions in turn;
* 2: two images in one user turn ("Picture 1: ... Picture 2: ..."), asked for both colours ("Red and blue."), both
  quadrants ("Top left and bottom right.") or both descriptions ("A red circle, top left; a blue cross, top right.");
* 1: two images in two user turns: "What colour is it?" about the first, "And this one?" about the second.
The user's wording varies (`QUESTIONS`), the answers do not: every answer is a short fixed function of the question
and the drawn attributes, which are uniform and independent (short answers: much of the supervised text depends on
the images, so a tiny model learns to look at them in a few hundred steps). So the least expected loss of a model that does not look at
the images is, per conversation, the entropy of the attributes its answers reveal for the first time
(`Conversation.info`, nats per assistant turn) -- `ernie_jax.data.vl_chat.text_only_bound` divides it by the
supervised tokens; a model that reads the images can go to ~0.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ernie_jax.data.vl import COLOURS, QUADRANTS, SHAPES, ShapeCaptions

SPLIT_SEEDS = {"train": 1, "heldout": 2}
SIZES = {"train": 100_000, "heldout": 64}
# nats of each attribute: colour, shape, quadrant (vertical x horizontal)
NATS = {"colour": math.log(len(COLOURS)), "shape": math.log(len(SHAPES)), "quadrant": math.log(len(QUADRANTS))}
QUESTIONS = {
  "colour": ("What colour is it?", "Which colour?"),
  "shape": ("What shape is it?", "Which shape?"),
  "quadrant": ("Where is it?", "Which corner?"),
  "describe": ("Describe it.", "What is this?"),
  "colours": ("What colours are they?", "Their colours?"),
  "quadrants": ("Where are they?", "Their corners?"),
  "describe2": ("Describe them.", "What are these?"),
}
SINGLE = (("colour", 1), ("shape", 1), ("quadrant", 1), ("describe", 3))  # one-question kinds and their weights
REVEALS = {"colour": ("colour",), "shape": ("shape",), "quadrant": ("quadrant",),
           "describe": ("colour", "shape", "quadrant")}
KINDS = (("single", 4), ("multi_turn", 3), ("two_images", 2), ("two_turns", 1))


@dataclasses.dataclass
class Conversation:
  messages: list[dict]  # OpenAI multimodal messages (PIL images)
  info: list[float]  # per assistant turn: nats of the attributes it reveals for the first time


def answer(kind: str, colour: str, shape: str, vertical: str, horizontal: str) -> str:
  """The (short) answer to a one-image question (`REVEALS` kinds)."""
  return {"colour": f"{colour.capitalize()}.", "shape": f"A {shape}.",
          "quadrant": f"{vertical.capitalize()} {horizontal}.",
          "describe": f"A {colour} {shape}, {vertical} {horizontal}."}[kind]


class ShapeChats:
  """Random access: conversation i (`Conversation`) of split "train" or "heldout", images of `image_size` pixels."""

  def __init__(self, split: str, image_size: int, size: int | None = None):
    if split not in SPLIT_SEEDS:
      raise ValueError(f"split must be one of {tuple(SPLIT_SEEDS)}, got {split!r}")
    self.split, self.seed = split, SPLIT_SEEDS[split]
    self.size = SIZES[split] if size is None else size
    self.shapes = ShapeCaptions(image_size, 2 * self.size, seed=self.seed)

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, i: int) -> Conversation:
    i = int(i)
    if not 0 <= i < self.size:
      raise IndexError(i)
    rng = np.random.default_rng([self.seed, 7, i])
    kinds, weights = zip(*KINDS)
    kind = kinds[rng.choice(len(kinds), p=np.asarray(weights) / sum(weights))]
    return getattr(self, "_" + kind)(rng, 2 * i)

  def _image(self, j: int) -> dict:
    return {"type": "image", "image": self.shapes[j][0]}

  @staticmethod
  def _ask(rng, kind: str) -> str:
    options = QUESTIONS[kind]
    return options[rng.integers(len(options))]

  def _turns(self, j: int, kinds, rng) -> Conversation:
    attrs = self.shapes.attributes(j)
    messages, info, known = [], [], set()
    for t, kind in enumerate(kinds):
      text = {"type": "text", "text": self._ask(rng, kind)}
      messages.append({"role": "user", "content": [self._image(j), text] if t == 0 else [text]})
      messages.append({"role": "assistant", "content": answer(kind, *attrs)})
      info.append(sum(NATS[a] for a in REVEALS[kind] if a not in known))
      known.update(REVEALS[kind])
    return Conversation(messages, info)

  def _single(self, rng, j: int) -> Conversation:
    kinds, weights = zip(*SINGLE)
    return self._turns(j, [kinds[rng.choice(len(kinds), p=np.asarray(weights) / sum(weights))]], rng)

  def _multi_turn(self, rng, j: int) -> Conversation:
    """Two or three different one-attribute questions (each answer reveals something new)."""
    one = [k for k, v in REVEALS.items() if len(v) == 1]
    return self._turns(j, [one[q] for q in rng.permutation(len(one))[:int(rng.integers(2, 4))]], rng)

  def _two_images(self, rng, j: int) -> Conversation:
    (c1, s1, v1, h1), (c2, s2, v2, h2) = self.shapes.attributes(j), self.shapes.attributes(j + 1)
    kind = ("colours", "quadrants", "describe2")[rng.integers(3)]
    reply = {"colours": f"{c1.capitalize()} and {c2}.", "quadrants": f"{v1.capitalize()} {h1} and {v2} {h2}.",
             "describe2": f"A {c1} {s1}, {v1} {h1}; a {c2} {s2}, {v2} {h2}."}[kind]
    user = [self._image(j), self._image(j + 1), {"type": "text", "text": self._ask(rng, kind)}]
    nats = 2 * {"colours": NATS["colour"], "quadrants": NATS["quadrant"], "describe2": sum(NATS.values())}[kind]
    return Conversation([{"role": "user", "content": user}, {"role": "assistant", "content": reply}], [nats])

  def _two_turns(self, rng, j: int) -> Conversation:
    messages = []
    for k, question in enumerate(("What colour is it?", "And this one?")):
      messages.append({"role": "user", "content": [self._image(j + k), {"type": "text", "text": question}]})
      messages.append({"role": "assistant", "content": answer("colour", *self.shapes.attributes(j + k))})
    return Conversation(messages, [NATS["colour"]] * 2)
