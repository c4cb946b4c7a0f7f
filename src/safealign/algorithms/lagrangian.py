"""The constraint E[C] ≤ d and its Lagrange multiplier λ, shared by the constrained RL methods (PPO-Lag, GRPO-Lag,
safe P3O).

    max_θ E[R]  subject to  E[C] ≤ d          solved as   min_θ max_{λ≥0}  −E[R] + λ·(E[C] − d)

λ = exp(log λ), updated once per rollout batch, before the policy update that uses it (docs/maths.md §5):
    J_C = mean of the raw episode costs C in the window (the last `episode_cost_window_size` samples of every
          process, all-gathered, so J_C and λ are identical on every rank),
    log λ ← min(log λ + α·λ·(J_C − d), log λ_max)       (`losses.lagrange_multiplier_update`),
not before step `lambda_update_delay_steps`. The step is plain SGD on log λ (as in safe-rlhf), so the multiplier has
no optimizer state beyond log λ; a checkpoint holds log λ and every process's cost window.

d is a number in the cost model's units, or (`threshold_quantile`) the q-quantile of the cost model's costs on the
answers `threshold_data` labels safe, so that d sits where that cost model puts safe answers rather than at a fixed
number in units each retrained cost model sets anew.

Context-aware constraints (docs/maths.md §10; `ContextMultipliers`): one λ_k per prompt category, each with its own
threshold d_k and window (`constraint_per_category`, `category_thresholds`), so that the policy cannot buy safety on
one category with harm on another; and the over-refusal guard (`refusal_floor`), a multiplier μ on the constraint
E[R | borderline prompts] ≥ floor that weighs those prompts' reward advantage up when their reward falls.

The rectified form (`constraint_form: rectified`, after RePO, Peng et al., arXiv 2410.19933, from the paper's summary:
its code is not public here) constrains every answer instead of the mean: the cost stream carries {C − d}⁺ =
max(C − d, 0), so an answer already under its threshold is not pushed further toward refusal and an unsafe answer is
not excused by the safe ones beside it (Safe RLHF's "safety compensation"); the constraint E[{C − d}⁺] ≤ 0 makes
λ non-decreasing (capped at λ_max) while any answer violates it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator

from safealign.algorithms.losses import combined_advantage, lagrange_multiplier_update, lagrange_multipliers_update
from safealign.config import ConfigError, config_field
from safealign.data.loading import load_preferences
from safealign.data.schema import PromptRecord
from safealign.models.category_head import load_category_head, prompt_features
from safealign.models.presets import resolve_device
from safealign.models.score_model import load_score_model, score_texts
from safealign.models.tokenizer import load_tokenizer
from safealign.training.common import console


@dataclass
class ConstraintConfig:
    """The cost model, the threshold d and λ's dynamics (defaults: safe-rlhf's, λ_0 1, α 0.1, λ_max 5, d 0, window
    128). Mixed into the config of every constrained RL method."""

    cost_model: str = config_field("runs/cm/model", help="Frozen cost model (a score model directory, `safealign cm`): cost > 0 means unsafe.")
    threshold: float = config_field(0.0, help="d: the constraint E[C] ≤ d (0 = no more unsafe than the cost model's boundary).")
    lambda_init: float = config_field(1.0, help="λ_0: initial Lagrange multiplier (> 0).")
    lambda_lr: float = config_field(0.1, help="α: learning rate of log λ (gradient ascent on the dual).")
    lambda_max: float = config_field(5.0, help="λ_max: upper bound of λ (≤ 0 = none).")
    lambda_update_delay_steps: int = config_field(0, help="Steps (rollouts) before λ starts moving; costs enter the window meanwhile.")
    episode_cost_window_size: int = config_field(128, help="J_C is the mean episode cost of the last this many samples of each process.")
    threshold_quantile: float = config_field(
        0.0, help="In (0, 1): d = this quantile of the cost model's costs on the responses threshold_data labels safe "
                  "(d in the cost model's own units), replacing threshold; 0 = threshold as given.")
    threshold_data: str = config_field("", help="Preference file (PKU format) whose safe-labelled responses set d with threshold_quantile.")
    constraint_per_category: bool = config_field(
        False, help="One λ_k per prompt category (the prompt file's `category`; prompts without one share the group "
                    "'none'), each updated from its own prompts' episode costs against its own d_k.")
    category_thresholds: dict[str, float] = config_field(
        {}, help="d_k per category with constraint_per_category, e.g. {child_abuse: -3.0}; other categories get threshold "
                 "(with threshold_quantile, a category's d_k is added to the computed d).")
    constraint_form: Literal["expected", "rectified"] = config_field(
        "expected", help="expected = Safe RLHF's E[C] ≤ d; rectified = RePO's per-answer constraint: the cost stream carries "
                         "{C − d}⁺ (no push below d) and λ follows E[{C − d}⁺] ≤ 0.")
    missing_eos_cost_penalty: float = config_field(
        0.0, help="Added to the cost stream's end score of an answer cut at max_new_tokens (no EOS), in the update only: "
                  "λ still reads the cost model's cost. With missing_eos_penalty p on the reward and p here, a cut answer's "
                  "actor advantage falls by p whatever λ (with the reward's alone, by p / (1 + λ)); 0 = off.")
    refusal_floor: float | None = config_field(
        None, help="Over-refusal guard, in the reward model's units: the constraint E[R | borderline prompts (kind: "
                   "borderline)] ≥ this floor, with its own multiplier μ (λ's dynamics); their advantage becomes "
                   "((1 + μ)·A^R − λ·A^C) / (1 + μ + λ). null = off. It weighs only the borderline rollouts (on SafeWorld ~6% of "
                   "the RL prompts; prompt_kind_repeats adds more): there it bound without lowering over-refusal "
                   "(docs/results.md).")

    @property
    def context_aware(self) -> bool:
        return self.constraint_per_category or self.refusal_floor is not None

    def check_constraint(self) -> None:
        if not 0.0 <= self.threshold_quantile < 1.0 or (self.threshold_quantile > 0) != bool(self.threshold_data):
            raise ConfigError("threshold_quantile must be in [0, 1), and > 0 exactly when threshold_data is given")
        if self.category_thresholds and not self.constraint_per_category:
            raise ConfigError("category_thresholds needs constraint_per_category: true")
        for category, value in self.category_thresholds.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"category_thresholds: '{category}' must be a finite number, got {value!r}")
        if self.refusal_floor is not None and not math.isfinite(self.refusal_floor):
            raise ConfigError(f"refusal_floor must be a finite number or null, got {self.refusal_floor}")
        if self.missing_eos_cost_penalty < 0:
            raise ConfigError(f"missing_eos_cost_penalty must be >= 0 (it is added to the cost), got {self.missing_eos_cost_penalty}")
        if self.lambda_init <= 0:
            raise ConfigError(f"lambda_init must be > 0 (λ = exp(log λ)), got {self.lambda_init}")
        if self.episode_cost_window_size < 1:
            raise ConfigError("episode_cost_window_size must be >= 1")


class LagrangeMultiplier:
    """λ of one expected-cost constraint, with the window of recent episode costs that J_C averages."""

    def __init__(self, cfg: ConstraintConfig, output_dir: str | Path) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.log_lambda = math.log(cfg.lambda_init)
        # The last costs of every process, (processes, n ≤ window): identical on every rank after each update.
        self.episode_cost_windows = torch.zeros(0, 0)

    @property
    def value(self) -> float:
        return math.exp(self.log_lambda)

    def update(self, episode_costs: torch.Tensor, accelerator: Accelerator, step: int,
               threshold: float | None = None) -> dict[str, float]:
        """Add this rollout's episode costs (B,) to the window; J_C over every process's window, then
        log λ ← min(log λ + α·λ·(J_C − d), log λ_max) (d: `threshold`, else the config's). Returns the scalars
        identical on every rank."""
        cfg, rank, processes = self.cfg, accelerator.process_index, accelerator.num_processes
        threshold = cfg.threshold if threshold is None else threshold
        window = torch.cat([self._own_window(rank, processes), episode_costs.detach().float().cpu()])
        window = window[-cfg.episode_cost_window_size:]  # size = (n,), the same n on every process
        gathered = accelerator.gather(window.to(accelerator.device)).cpu()  # size = (processes · n,)
        self.episode_cost_windows = gathered.view(processes, -1)
        episode_cost = gathered.double().mean().item()  # J_C, the same on every rank
        if step >= cfg.lambda_update_delay_steps:
            self.log_lambda = lagrange_multiplier_update(self.log_lambda, episode_cost, threshold, cfg.lambda_lr,
                                                         cfg.lambda_max)
        if processes > 1:  # a per-rank trace: λ must be identical on every rank
            with open(self.output_dir / f"lagrange_multiplier_rank{rank}.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step + 1, "lagrange_multiplier": self.value,
                                         "episode_cost": episode_cost}) + "\n")
        return {"episode_cost": episode_cost, "lagrange_multiplier": self.value, "log_lambda": self.log_lambda,
                "threshold": cfg.threshold}  # d in the logs and metrics.json (with threshold_quantile it is computed)

    def step(self, batch: Any, accelerator: Accelerator, step: int) -> dict[str, float]:
        if self.cfg.constraint_form == "rectified":  # E[{C − d}⁺] ≤ 0
            return self.update((batch["scores_cost"] - self.cfg.threshold).clamp(min=0), accelerator, step, threshold=0.0)
        return self.update(batch["scores_cost"], accelerator, step)

    def row_multipliers(self, batch: Any) -> tuple[float, float]:
        """(λ, reward weight) of every row: one λ, weight 1."""
        return self.value, 1.0

    def row_thresholds(self, batch: Any) -> float:
        return self.cfg.threshold

    def _own_window(self, rank: int, processes: int) -> torch.Tensor:
        windows = self.episode_cost_windows
        if windows.numel() == 0:
            return torch.zeros(0)
        if windows.size(0) != processes:  # resumed with another number of processes: share the saved costs out
            flat = windows.flatten()
            per_process = len(flat) // processes
            return flat[rank * per_process:(rank + 1) * per_process]
        return windows[rank]

    def state_dict(self) -> dict[str, Any]:
        return {"log_lambda": self.log_lambda, "episode_cost_windows": self.episode_cost_windows.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_lambda = float(state["log_lambda"])
        self.episode_cost_windows = state["episode_cost_windows"].float()


NO_CATEGORY = "none"  # the group of the prompts without a category (benign and borderline ones on SafeWorld)


def require_a_categorised_prompt(category_thresholds: dict[str, float], prompts: list[PromptRecord], source: str) -> None:
    """A d of its own for the uncategorised prompts (a loose one: benign prompts train on the reward alone) needs
    categorised prompts beside them; with none, it would silently free every prompt from the harm constraint."""
    if NO_CATEGORY in category_thresholds and not any(p.category for p in prompts):
        raise ConfigError(f"{source}: no prompt has a `category`, and category_thresholds gives '{NO_CATEGORY}' (the "
                          "prompts without one) its own d: no prompt would keep the harm constraint. Give the prompts a "
                          "`category`, train the cost model's category head (cm: {category_head: true}), or drop "
                          f"'{NO_CATEGORY}' from category_thresholds")


class ContextMultipliers:
    """The context-aware constraints, each with its multiplier and window (docs/maths.md §10):

        λ_k:  E[C | prompts of category k] ≤ d_k          for every category k of the prompt file (and 'none')
        μ:    E[R | borderline prompts] ≥ floor,  i.e.  E[−R] ≤ −floor      (with `refusal_floor`)

    Every multiplier takes λ's step, log m ← min(log m + α·m·(J − b), log m_max) (`losses.lagrange_multipliers_update`),
    J the mean of its constraint's last `episode_cost_window_size` × processes observations, gathered from every
    process (so identical on every rank). A multiplier moves only on a step that had its constraint's prompts: a rare
    category's λ_k does not run away on one old observation while the batches hold none of it. A row's advantage
    uses its prompt's λ_k and w = 1 + μ on a borderline prompt: A = (w·A^R − λ_k·A^C) / (w + λ_k)."""

    def __init__(self, cfg: ConstraintConfig, prompts: list[PromptRecord]) -> None:
        self.cfg = cfg
        # without constraint_per_category, one cost constraint over every prompt ('all'), beside the guard
        categories = sorted({p.category or NO_CATEGORY for p in prompts}) if cfg.constraint_per_category else ["all"]
        unknown = sorted(set(cfg.category_thresholds) - set(categories))
        if unknown:
            raise ConfigError(f"category_thresholds names {unknown}, which no prompt of prompt_data has (its "
                              f"categories: {categories})")
        require_a_categorised_prompt(cfg.category_thresholds, prompts, "prompt_data")
        self.categories = categories
        self.guarded = cfg.refusal_floor is not None
        self.names = categories + (["refusal_guard"] if self.guarded else [])
        bounds = [cfg.threshold + cfg.category_thresholds.get(c, 0.0) if cfg.threshold_quantile > 0
                  else cfg.category_thresholds.get(c, cfg.threshold) for c in categories]
        self.bounds = torch.tensor(bounds + ([-cfg.refusal_floor] if self.guarded else []), dtype=torch.float64)  # (K,)
        self.log_multipliers = torch.full((len(self.names),), math.log(cfg.lambda_init), dtype=torch.float64)  # (K,)
        self.windows = [torch.zeros(0, dtype=torch.float64) for _ in self.names]  # each constraint's last observations
        index = {c: k for k, c in enumerate(categories)}
        self.prompt_category = torch.tensor([index[p.category or NO_CATEGORY] if cfg.constraint_per_category else 0
                                             for p in prompts])  # size = (N,): each prompt's constraint
        self.prompt_borderline = torch.tensor([p.kind == "borderline" for p in prompts])  # size = (N,)
        if self.guarded and not self.prompt_borderline.any():
            raise ConfigError("refusal_floor: no prompt of prompt_data has kind 'borderline' to guard")

    def observations(self, batch: Any) -> torch.Tensor:
        """What each constraint observes in this batch: (B, K), NaN where a row is not under that constraint (the cost
        of a row under its category's λ_k; −R of a borderline row under the guard)."""
        rows = batch["prompt_index"].cpu()
        costs = batch["scores_cost"].detach().double().cpu()  # size = (B,)
        values = torch.full((len(rows), len(self.names)), math.nan, dtype=torch.float64)
        category = self.prompt_category[rows]  # size = (B,)
        if self.cfg.constraint_form == "rectified":  # {C − d_k}⁺, against 0
            costs = (costs - self.bounds[category]).clamp(min=0)
        values[torch.arange(len(rows)), category] = costs
        if self.guarded:
            borderline = self.prompt_borderline[rows]
            values[borderline, -1] = -batch["scores_reward"].detach().double().cpu()[borderline]
        return values

    def step(self, batch: Any, accelerator: Accelerator, step: int) -> dict[str, float]:
        """Add this batch's observations (every process's) to the windows, then one step of every multiplier. Returns
        the scalars identical on every rank: each constraint's J, multiplier and bound, and the mean episode cost."""
        cfg = self.cfg
        gathered = accelerator.gather(self.observations(batch).to(accelerator.device)).cpu()  # size = (processes · B, K)
        size = cfg.episode_cost_window_size * accelerator.num_processes
        observed = ~gathered.isnan().all(dim=0)  # size = (K,): the constraints this batch has rows of
        for k in range(len(self.names)):
            seen = gathered[:, k][~gathered[:, k].isnan()]
            self.windows[k] = torch.cat([self.windows[k], seen])[-size:]
        means = torch.stack([w.mean() if len(w) else torch.tensor(math.nan, dtype=torch.float64) for w in self.windows])
        targets = self.bounds.clone()
        if cfg.constraint_form == "rectified":
            targets[:len(self.categories)] = 0.0  # E[{C − d_k}⁺] ≤ 0
        if step >= cfg.lambda_update_delay_steps:
            self.log_multipliers = lagrange_multipliers_update(self.log_multipliers, means, targets, cfg.lambda_lr,
                                                               cfg.lambda_max, observed)
        costs = gathered[:, :len(self.categories)]
        scalars = {"episode_cost": costs[~costs.isnan()].mean().item(),  # this step's, all categories
                   "lagrange_multiplier": self.log_multipliers[:len(self.categories)].exp().mean().item()}
        violated = 0
        for k, name in enumerate(self.names):
            if name == "refusal_guard":
                scalars.update(refusal_guard_multiplier=self.log_multipliers[k].exp().item(),
                               refusal_floor=-self.bounds[k].item())
                if observed[k]:
                    scalars["borderline_reward"] = -means[k].item()
                continue
            scalars.update({f"lagrange_multiplier/{name}": self.log_multipliers[k].exp().item(),
                            f"threshold/{name}": self.bounds[k].item()})
            if observed[k]:  # logged (and λ_k moved) on the steps that had the category's prompts
                scalars[f"episode_cost/{name}"] = means[k].item()
                violated += int(means[k].item() > targets[k].item())
        scalars["violated_constraints"] = float(violated)  # categories over their d_k ("safety compensation")
        if accelerator.num_processes > 1:  # a per-rank trace: every multiplier must be identical on every rank
            trace = Path(cfg.output_dir) / f"lagrange_multiplier_rank{accelerator.process_index}.jsonl"
            with open(trace, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step + 1, "lagrange_multiplier": scalars["lagrange_multiplier"],
                                         "episode_cost": scalars["episode_cost"],
                                         "multipliers": dict(zip(self.names, self.log_multipliers.exp().tolist()))}) + "\n")
        return scalars

    def row_multipliers(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Each row's λ (its prompt category's) and reward weight (1 + μ on a borderline prompt, else 1): (B,), (B,)."""
        rows = batch["prompt_index"].cpu()
        multipliers = self.log_multipliers.exp()
        lambdas = multipliers[self.prompt_category[rows]]  # size = (B,)
        if not self.guarded:
            return lambdas, 1.0
        return lambdas, 1.0 + multipliers[-1] * self.prompt_borderline[rows].double()

    def row_thresholds(self, batch: Any) -> torch.Tensor:
        """Each row's d_k: (B,)."""
        return self.bounds[self.prompt_category[batch["prompt_index"].cpu()]]

    def state_dict(self) -> dict[str, Any]:
        return {"constraints": list(self.names), "log_multipliers": self.log_multipliers.clone(),
                "windows": [w.clone() for w in self.windows]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state.get("constraints", [])) != self.names:
            raise ConfigError(f"the checkpoint's constraints {state.get('constraints')} are not this run's {self.names} "
                              "(another prompt file, or constraint_per_category / refusal_floor changed)")
        self.log_multipliers = state["log_multipliers"].double()
        self.windows = [w.double() for w in state["windows"]]


class Constrained:
    """What a constrained RL algorithm adds to its unconstrained base (`class PPOLag(Constrained, PPO)`): the cost
    model beside the reward model, the constraint's step of a rollout batch, and λ in the run's checkpoints. The
    algorithm creates `self.lagrangian` and says in its own `train_step` where the step goes (before the update)."""

    cfg: Any
    lagrangian: LagrangeMultiplier | ContextMultipliers

    def score_model_paths(self) -> dict[str, str]:
        return {"reward": self.cfg.reward_model, "cost": self.cfg.cost_model}

    def start(self, prompts: list[PromptRecord]) -> None:
        """With context-aware constraints, their multipliers, one per constraint of these prompts (a prompt without
        a category gets the cost model's category head's, when it has one)."""
        if self.cfg.context_aware:
            if self.cfg.constraint_per_category:
                prompts = categorised(prompts, self.cfg.cost_model, self.cfg.tokenizer or self.cfg.actor_model)
            self.lagrangian = ContextMultipliers(self.cfg, prompts)

    def stream_end_scores(self, scores: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:
        """The reward and cost streams' end scores (B,): the cost C, or {C − d}⁺ in the rectified form (each row's d);
        + missing_eos_cost_penalty for an answer cut at max_new_tokens (the reward's penalty is the caller's)."""
        cost = scores["cost"]
        if self.cfg.constraint_form == "rectified":
            thresholds = self.lagrangian.row_thresholds(batch)
            thresholds = thresholds if isinstance(thresholds, float) else thresholds.to(cost)
            cost = (cost - thresholds).clamp(min=0)
        if self.cfg.missing_eos_cost_penalty:  # λ's episode costs stay scores_cost: a cut answer is not unsafe, it is cut
            cost = cost + self.cfg.missing_eos_cost_penalty * (~batch["ended_with_eos"]).to(cost.dtype)
        return {"reward": scores["reward"], "cost": cost}

    def constraint_step(self, batch: Any, accelerator: Accelerator, step: int, scalars: dict[str, float]) -> dict[str, float]:
        """This process's share of answers the cost model calls unsafe (cost > 0) into `scalars`; then λ (or every
        multiplier) from the episode costs scores_cost (B,). Returns the scalars identical on every rank (J_C, λ, d)."""
        scalars["unsafe_fraction"] = (batch["scores_cost"] > 0).float().mean().item()
        return self.lagrangian.step(batch, accelerator, step)

    def combined(self, reward: torch.Tensor, cost: torch.Tensor, batch: Any) -> torch.Tensor:
        """(A^R − λ·A^C) / (1 + λ) with the current λ; with context-aware constraints each row's own λ_k and reward
        weight w: (w·A^R − λ_k·A^C) / (w + λ_k). reward, cost (B,) or (B, T) -> the same shape."""
        lambdas, weights = self.lagrangian.row_multipliers(batch)
        if isinstance(lambdas, float):
            return combined_advantage(reward, cost, lambdas)
        shape = (-1,) + (1,) * (reward.dim() - 1)  # a row's multipliers on each of its tokens
        weights = weights if isinstance(weights, float) else weights.view(shape).to(reward)
        return combined_advantage(reward, cost, lambdas.view(shape).to(reward), weights)

    def state_dict(self) -> dict[str, Any]:
        return self.lagrangian.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lagrangian.load_state_dict(state)


def categorised(prompts: list[PromptRecord], cost_model: str, fallback_tokenizer: str) -> list[PromptRecord]:
    """The prompts, those without a category given the one the cost model's category head predicts for them (or none);
    unchanged when every prompt has one or the cost model has no head. Deterministic: every process agrees."""
    missing = [n for n, p in enumerate(prompts) if not p.category]
    head = load_category_head(cost_model) if missing else None
    if head is None:
        return prompts
    model = load_score_model(cost_model).to(resolve_device("auto"))
    has_tokenizer = (Path(cost_model) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(cost_model if has_tokenizer else fallback_tokenizer)
    predicted = head.predict(prompt_features(model, tokenizer, [prompts[n].prompt for n in missing]))
    prompts = list(prompts)
    for n, category in zip(missing, predicted):
        prompts[n] = dataclasses.replace(prompts[n], category=category)
    console.print(f"category head of {cost_model}: {sum(c is not None for c in predicted)} of the {len(missing)} prompts "
                  "without a category got one")
    return prompts


def cost_quantile(cost_model: str, tokenizer: str, data: str, quantile: float, max_length: int = 256) -> tuple[float, int]:
    """The `quantile` of the cost model's costs on the distinct (prompt, response) that `data` labels safe, and
    their number. Deterministic: every process computes the same d."""
    safe = list(dict.fromkeys((record.prompt, record.response(i)) for record in load_preferences(data)
                              for i in (0, 1) if record.is_safe(i)))
    if not safe:
        raise ConfigError(f"{data}: no response labelled safe to set the threshold from (threshold_quantile)")
    model = load_score_model(cost_model).to(resolve_device("auto")).eval()
    costs = score_texts(model, load_tokenizer(tokenizer), [p for p, _ in safe], [r for _, r in safe], max_length)
    return torch.quantile(torch.tensor(costs, dtype=torch.float64), quantile).item(), len(safe)


def resolve_threshold(cfg: Any, fallback_tokenizer: str) -> tuple[Any, dict[str, Any]]:
    """cfg with d computed from `threshold_quantile` when it is set (and the number of safe answers that set it);
    cfg unchanged otherwise. The cost model's own tokenizer when it has one, else `fallback_tokenizer`."""
    if cfg.threshold_quantile <= 0:
        return cfg, {}
    has_tokenizer = (Path(cfg.cost_model) / "tokenizer_config.json").is_file()
    tokenizer = cfg.cost_model if has_tokenizer else fallback_tokenizer
    threshold, count = cost_quantile(cfg.cost_model, tokenizer, cfg.threshold_data, cfg.threshold_quantile)
    return dataclasses.replace(cfg, threshold=threshold), {"threshold_safe_responses": count}
