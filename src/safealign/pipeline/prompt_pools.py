"""Where a round's new pairs come from: four pools of prompts (unsafe, redteam, solved, benign; `redteam`'s docstring,
step 3), their quotas by `prompt_mix` and the seeded choice of each pair's prompt."""

from __future__ import annotations

import random
from typing import Any

from safealign.config import ConfigError

POOLS = ("unsafe", "redteam", "solved", "benign")
DEFAULT_PROMPT_MIX = {"unsafe": 0.3, "redteam": 0.2, "solved": 0.2, "benign": 0.3}


def _split(count: int, weights: dict[str, float]) -> dict[str, int]:
    """`count` split in proportion to `weights`, rounded by largest remainders (ties: POOLS order)."""
    total = sum(weights.values())
    exact = {name: count * weight / total for name, weight in weights.items()}
    shares = {name: int(value) for name, value in exact.items()}
    by_remainder = sorted(exact, key=lambda name: (exact[name] - shares[name], -POOLS.index(name)), reverse=True)
    for name in by_remainder[:count - sum(shares.values())]:
        shares[name] += 1
    return shares


def pool_quotas(sizes: dict[str, int], mix: dict[str, float], count: int, max_per_prompt: int = 0) -> dict[str, int]:
    """Pairs per pool: `count` split by `mix` over the non-empty pools. A pool gives at most
    `max_per_prompt` pairs per prompt (0 = no cap); what it cannot take goes to the others in proportion
    (fewer than `count` only when every pool is full)."""
    active = {name: mix.get(name, 0.0) for name in POOLS if sizes.get(name, 0) > 0 and mix.get(name, 0.0) > 0}
    if count and not active:
        raise ConfigError("redteam: no prompts to sample pairs on (every pool with a share in prompt_mix is empty)")
    capacity = {name: sizes[name] * max_per_prompt if max_per_prompt > 0 else count for name in active}
    quotas = dict.fromkeys(active, 0)
    while active and sum(quotas.values()) < count:
        for name, share in _split(count - sum(quotas.values()), active).items():
            quotas[name] += min(share, capacity[name] - quotas[name])
        active = {name: weight for name, weight in active.items() if quotas[name] < capacity[name]}
    return quotas


def choose_pair_prompts(pools: dict[str, list[dict[str, Any]]], mix: dict[str, float], count: int,
                        rng: random.Random, max_per_prompt: int = 0) -> list[tuple[dict[str, Any], str]]:
    """(prompt row, pool) of each new pair: `pool_quotas` per pool; within a pool, every prompt once in a
    seeded order before any prompt twice."""
    chosen: list[tuple[dict[str, Any], str]] = []
    for name, quota in pool_quotas({k: len(v) for k, v in pools.items()}, mix, count, max_per_prompt).items():
        order: list[dict[str, Any]] = []
        while len(order) < quota:
            order += rng.sample(pools[name], len(pools[name]))
        chosen += [(row, name) for row in order[:quota]]
    return chosen


def prompt_pools(probed: list[dict[str, Any]], redteam: list[dict[str, Any]],
                 probe_prompts: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The four pools of the new pairs' prompts (module docstring, step 3) from the probed rows (with
    `unsafe`), the probed red-team rows and all probe prompts (with `kind`)."""
    return {
        "unsafe": [row for row in probed if row["unsafe"]],
        "redteam": list(redteam),
        "solved": [row for row in probed if not row["unsafe"] and row.get("kind") == "harmful"],
        "benign": [row for row in probe_prompts if row.get("kind") in ("benign", "borderline")],
    }
