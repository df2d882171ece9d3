"""Extend a language model's vocabulary and train only the new tokens' embeddings.

A small NNX language model (an embedding, an MLP over the last few tokens, and
logits tied to the embedding plus a per-token output bias) is pretrained on a
toy corpus generated in code by a small grammar ("the big dog chases a cat .").
Then the vocabulary grows by a few words it has never seen (a new noun class
and its verbs: "the robot beeps near the garden ."):

1. a bigger model is built, the old weights are copied in, and the new
   tokens' rows start at the mean of the old rows (plus a little noise);
2. the whole model is frozen, and only the new tokens' rows of the embedding
   and of the output bias are made trainable with
   ``ff.unfreeze(model, "embed/embedding|out_bias", where=ff.Rows(new_ids))``;
   they become ``ff.PartlyFrozen`` arrays that the model reads as whole ones;
3. ``ff.TrainStep`` with ``ff.Optimizer(model, optax.adamw(...))`` trains on
   sentences that use the new words (with some old sentences mixed in, so
   the new rows also learn where they do not belong). Gradients and AdamW's
   moments exist for the new rows only, and weight decay never touches the
   old rows: every old row and every other weight is checked to be
   bit-identical afterwards (main() raises RuntimeError otherwise).

It prints the summary table, the optimizer state's shapes, the held-out loss
on sentences with the new words before and after, and on old sentences. The
old weights do not move, yet the loss on old sentences rises a little: the new
tokens take some probability mass in the softmax.

    python examples/vocab_extension.py [--pretrain-steps N] [--steps N] [--seed S] [--replay R]
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flax_freeze as ff

#: How many preceding tokens the model reads to predict the next one.
CONTEXT = 3

SPECIALS = ["<bos>", "."]
DETERMINERS = ["the", "a"]
ADJECTIVES = ["big", "small", "red", "old", "happy", "quiet"]
NOUNS = ["cat", "dog", "bird", "fish", "man", "woman", "child", "horse"]
TRANSITIVE = ["sees", "likes", "chases", "finds", "follows"]
INTRANSITIVE = ["runs", "sleeps", "sings", "swims", "waits"]
PREPOSITIONS = ["in", "near", "on"]
PLACES = ["park", "house", "garden", "river", "field"]
#: The vocabulary the model is pretrained with (36 tokens).
OLD_WORDS = [
    *SPECIALS,
    *DETERMINERS,
    *ADJECTIVES,
    *NOUNS,
    *TRANSITIVE,
    *INTRANSITIVE,
    *PREPOSITIONS,
    *PLACES,
]
#: The words added later: machines, with verbs of their own.
NEW_NOUNS = ["robot", "drone"]
NEW_VERBS = ["beeps", "hovers"]
NEW_WORDS = [*NEW_NOUNS, *NEW_VERBS]


def generate(
    rng: np.random.Generator,
    n: int,
    nouns: list[str],
    intransitive: list[str],
    transitive: list[str],
) -> list[list[str]]:
    """``n`` sentences of the grammar with the given nouns and verbs.

    A sentence is ``DET [ADJ] NOUN VT DET [ADJ] NOUN .`` or
    ``DET [ADJ] NOUN VI [PREP DET PLACE] .``; the subject comes from
    ``nouns``, the object from the old nouns.
    """

    def pick(words: list[str]) -> str:
        return words[rng.integers(len(words))]

    def noun_phrase(candidates: list[str]) -> list[str]:
        adjective = [pick(ADJECTIVES)] if rng.random() < 0.5 else []
        return [pick(DETERMINERS), *adjective, pick(candidates)]

    sentences = []
    for _ in range(n):
        words = noun_phrase(nouns)
        if transitive and rng.random() < 0.5:
            words += [pick(transitive), *noun_phrase(NOUNS)]
        else:
            words.append(pick(intransitive))
            if rng.random() < 0.7:
                words += [pick(PREPOSITIONS), pick(DETERMINERS), pick(PLACES)]
        sentences.append([*words, "."])
    return sentences


def windows(sentences: list[list[str]], vocab: dict[str, int]) -> tuple[jax.Array, jax.Array]:
    """Every next-token prediction in ``sentences``: ``CONTEXT`` tokens before it, and it."""
    contexts, targets = [], []
    for sentence in sentences:
        ids = [vocab["<bos>"]] * CONTEXT + [vocab[w] for w in sentence]
        for t in range(CONTEXT, len(ids)):
            contexts.append(ids[t - CONTEXT : t])
            targets.append(ids[t])
    return jnp.asarray(contexts, jnp.int32), jnp.asarray(targets, jnp.int32)


class LM(nnx.Module):
    """Embeds the last ``CONTEXT`` tokens, mixes them with an MLP, and scores every token.

    The logits are tied to the embedding (``embed.attend``) plus a per-token
    output bias, so a token's embedding row serves both as input and output.
    """

    def __init__(self, vocab_size: int, dim: int, hidden: int, rngs: nnx.Rngs) -> None:
        """Builds the layers for a vocabulary of ``vocab_size`` tokens."""
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.hidden = nnx.Linear(CONTEXT * dim, hidden, rngs=rngs)
        self.project = nnx.Linear(hidden, dim, rngs=rngs)
        self.out_bias = nnx.Param(jnp.zeros((vocab_size,)))

    def __call__(self, context: jax.Array) -> jax.Array:
        """Logits of the next token after each row of ``context`` (batch, CONTEXT)."""
        x = self.embed(context).reshape(context.shape[0], -1)
        h = self.project(nnx.gelu(self.hidden(x)))
        return self.embed.attend(h) + self.out_bias[...]


def loss_fn(model: LM, context: jax.Array, target: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(model(context), target).mean()


@nnx.jit
def evaluate(model: LM, context: jax.Array, target: jax.Array) -> jax.Array:
    """The loss, without training."""
    return loss_fn(model, context, target)


def extend(old: LM, n_new: int, dim: int, hidden: int, seed: int) -> LM:
    """A model with ``n_new`` more tokens: the old weights copied, new rows at the old mean.

    Starting new embeddings at the mean of the old ones (and new biases at
    the mean old bias) keeps the new tokens from taking much probability
    before they are trained; a little noise tells them apart.
    """
    n_old = old.embed.num_embeddings
    model = LM(n_old + n_new, dim, hidden, nnx.Rngs(seed))
    nnx.update(model.hidden, nnx.state(old.hidden))
    nnx.update(model.project, nnx.state(old.project))
    table = old.embed.embedding[...]
    noise = 0.01 * jax.random.normal(jax.random.key(seed), (n_new, dim))
    new_rows = table.mean(0, keepdims=True) + noise
    model.embed.embedding[...] = jnp.concatenate([table, new_rows])
    bias = old.out_bias[...]
    model.out_bias[...] = jnp.concatenate([bias, jnp.full((n_new,), bias.mean())])
    return model


def snapshot(model: LM) -> dict[str, np.ndarray]:
    """Every array of the model's state as NumPy, by path, and the partly frozen arrays whole.

    A partly frozen array is three arrays of state (``.../trainable``,
    ``.../frozen``, ``.../index``); ``embed/embedding`` and ``out_bias`` are
    added as the model reads them: whole, the trainable rows in place.
    """
    out = {
        "/".join(map(str, path)): np.array(variable.get_raw_value())
        for path, variable in nnx.to_flat_state(nnx.state(model))
    }
    out["embed/embedding"] = np.array(model.embed.embedding[...])
    out["out_bias"] = np.array(model.out_bias[...])
    return out


def check_old_weights_identical(
    before: dict[str, np.ndarray], after: dict[str, np.ndarray], n_old: int
) -> bool:
    """Raises RuntimeError unless every old row and every other array is bit-identical.

    Only the trainable parts (the new rows) may move; of the whole
    embedding table and output bias, the first ``n_old`` rows are compared.
    """
    moved = []
    for name, old in before.items():
        if name.endswith("/trainable"):
            continue
        new = after[name]
        if name in ("embed/embedding", "out_bias"):
            old, new = old[:n_old], new[:n_old]
        if old.shape != new.shape or old.tobytes() != new.tobytes():
            moved.append(name)
    if moved or before.keys() != after.keys():
        raise RuntimeError(f"frozen weights moved during training: {moved}")
    return True


def state_shapes(opt: ff.Optimizer) -> dict[str, tuple[int, ...]]:
    """The shapes of the optimizer state's arrays (scalars such as step counts left out)."""
    return {
        "/".join(map(str, path)): tuple(np.shape(v.get_raw_value()))
        for path, v in nnx.to_flat_state(nnx.state(opt.opt_state))
        if np.ndim(v.get_raw_value()) > 0
    }


def main(
    pretrain_steps: int = 200,
    steps: int = 300,
    seed: int = 0,
    dim: int = 24,
    hidden: int = 64,
    replay: int = 200,
) -> dict[str, Any]:
    """Pretrains, extends the vocabulary, trains the new rows alone; returns the numbers.

    Args:
        pretrain_steps: full-batch Adam steps on the old corpus.
        steps: full-batch AdamW steps on the new tokens' rows.
        seed: seeds the corpus, the weights and the new rows' noise.
        dim: embedding width.
        hidden: MLP width.
        replay: old sentences mixed into the new-word training set, so the
            new rows also learn to stay unlikely where the old words belong.

    Returns:
        The losses before and after, the counts of trainable elements and of
        optimizer state, its shapes, and whether the old weights are
        bit-identical (always True: main() raises otherwise).
    """
    rng = np.random.default_rng(seed)
    vocab = {w: i for i, w in enumerate(OLD_WORDS + NEW_WORDS)}  # old words keep their ids
    n_old, n_new = len(OLD_WORDS), len(NEW_WORDS)
    new_ids = [vocab[w] for w in NEW_WORDS]

    corpus = generate(rng, 1000, NOUNS, INTRANSITIVE, TRANSITIVE)
    old_train = windows(corpus, vocab)
    old_test = windows(generate(rng, 200, NOUNS, INTRANSITIVE, TRANSITIVE), vocab)
    # sentences about the machines: they beep and hover, and see or find things
    new_sentences = generate(rng, 300, NEW_NOUNS, NEW_VERBS, TRANSITIVE)
    new_train = windows(new_sentences[:200] + corpus[:replay], vocab)
    new_test = windows(new_sentences[200:], vocab)
    print(f"vocabulary: {n_old} tokens, then {n_new} more: {', '.join(NEW_WORDS)}")
    print("a sentence with new words: " + " ".join(new_sentences[0]))

    base = LM(n_old, dim, hidden, nnx.Rngs(seed))
    step = ff.TrainStep(base, ff.Optimizer(base, optax.adam(3e-3)), loss_fn)
    for _ in range(pretrain_steps):
        step(*old_train)
    pretrain_loss = float(evaluate(base, *old_test))
    print(f"pretrained {pretrain_steps} steps: held-out loss on old sentences {pretrain_loss:.3f}")

    model = extend(base, n_new, dim, hidden, seed + 1)
    ff.freeze(model)
    ff.unfreeze(model, "embed/embedding|out_bias", where=ff.Rows(new_ids))
    summary = ff.summary(model)
    print(summary)

    opt = ff.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1))
    shapes = state_shapes(opt)
    print("optimizer state arrays: " + ", ".join(f"{p} {s}" for p, s in shapes.items()))

    before = snapshot(model)
    old_loss_before = float(evaluate(model, *old_test))
    new_loss_before = float(evaluate(model, *new_test))
    step = ff.TrainStep(model, opt, loss_fn)
    for _ in range(steps):
        step(*new_train)
    new_loss_after = float(evaluate(model, *new_test))
    old_loss_after = float(evaluate(model, *old_test))
    after = snapshot(model)
    identical = check_old_weights_identical(before, after, n_old)
    new_rows_moved = bool(
        np.all(after["embed/embedding"][n_old:] != before["embed/embedding"][n_old:])
    )
    print(
        f"held-out loss on sentences with new words: {new_loss_before:.3f} -> {new_loss_after:.3f}"
    )
    print(f"held-out loss on old sentences: {old_loss_before:.3f} -> {old_loss_after:.3f}")
    print(f"old rows and every other weight bit-identical: {identical}")
    return {
        "pretrain_loss": pretrain_loss,
        "new_loss_before": new_loss_before,
        "new_loss_after": new_loss_after,
        "old_loss_before": old_loss_before,
        "old_loss_after": old_loss_after,
        "n_old": n_old,
        "n_new": n_new,
        "dim": dim,
        "trainable_count": summary.trainable_count,
        "frozen_count": summary.frozen_count,
        "opt_state_shapes": shapes,
        "opt_state_count": sum(int(np.prod(s)) for s in shapes.values()),
        "old_identical": identical,
        "new_rows_moved": new_rows_moved,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=200, help="pretraining steps")
    parser.add_argument("--steps", type=int, default=300, help="steps on the new tokens")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--replay", type=int, default=200, help="old sentences mixed in")
    args = parser.parse_args()
    main(args.pretrain_steps, args.steps, args.seed, replay=args.replay)
