"""SafeWorld: a small, seeded, simulated language world with hidden gold judges and simulated annotators.

It is a simulation (it stands in for the paper's crowdworkers and human evaluators) so that Safe RLHF can
be run and measured offline (docs/safeworld.md): prompts (benign, harmful in the 14 categories, borderline),
responses built from moves (helpful content, refusal, safe redirection, harmful compliance, filler),
gold judges that read only the text, and annotators that answer decoupled (or coupled) questions.
"""

from safealign.data.safeworld.annotators import Annotator, Annotators
from safealign.data.safeworld.generate import (
    HELDOUT_FRAMES,
    SIMULATION_NOTICE,
    SPLITS,
    TRAIN_FRAMES,
    World,
    WorldConfig,
    generate_world,
    prompt_instances,
    run,
    sample_pair_move,
    sft_move,
    split_prompts,
    world_annotators,
    world_stats,
    world_texts,
    write_world,
)
from safealign.data.safeworld.judges import (
    HarmJudgement,
    PromptInfo,
    ResponseClass,
    classify_response,
    is_safeworld,
    judge_harm,
    judge_helpfulness,
    normalise,
    parse_prompt,
    why,
)
from safealign.data.safeworld.responses import MOVES, sample_response

__all__ = [
    "HELDOUT_FRAMES",
    "MOVES",
    "SIMULATION_NOTICE",
    "SPLITS",
    "TRAIN_FRAMES",
    "Annotator",
    "Annotators",
    "HarmJudgement",
    "PromptInfo",
    "ResponseClass",
    "World",
    "WorldConfig",
    "classify_response",
    "generate_world",
    "is_safeworld",
    "judge_harm",
    "judge_helpfulness",
    "normalise",
    "parse_prompt",
    "prompt_instances",
    "run",
    "sample_pair_move",
    "sample_response",
    "sft_move",
    "split_prompts",
    "why",
    "world_annotators",
    "world_stats",
    "world_texts",
    "write_world",
]
