"""The Hub tags a model card may carry: one list, one meaning each.

Ops add the tags that describe what they did (`LazyModel.tags`); the card adds
`recipekit` to every output and `merge` to every output built from more than
one input model, so no op can forget either. A test checks that every op's
tags are in `VOCABULARY`.
"""
from __future__ import annotations

RECIPEKIT = "recipekit"  # every output
PRUNED = "pruned"  # some of a model's layers removed, the others kept in their order
FRANKENMERGE = "frankenmerge"  # layers stacked otherwise: repeated, reordered, or taken from several models
MOE = "moe"  # a Mixture of Experts stacked from the MLPs of dense models
UPCYCLED = "upcycled"  # a Mixture of Experts whose attention and experts all come from one dense model
EXPANDED = "expanded"  # identity layers inserted (block expansion): the model computes what it did, with room to train
HEALED = "healed"  # some weights trained by heal (after pruning, to recover what it cost)
MERGE = "merge"  # the weights of more than one input model in one model: a merge, or a frankenmerge or MoE of several

VOCABULARY = (RECIPEKIT, PRUNED, FRANKENMERGE, EXPANDED, HEALED, MOE, UPCYCLED, MERGE)


def ordered(tags: set[str] | tuple[str, ...]) -> list[str]:
    """`tags` in vocabulary order, so that a card lists the same tags the same way whichever step added them."""
    return sorted(set(tags), key=lambda t: (VOCABULARY.index(t) if t in VOCABULARY else len(VOCABULARY), t))
