"""LoRA training with TRL: SFT on edits, DPO on preference pairs, KTO on unpaired thumbs, RL, or `auto`.

`auto` picks what moved behaviour on the default model. With users' edits it trains SFT (shared/probes/learning.md:
SFT on edits took held-out approval 0% -> 94% where DPO on the same edits, at reward accuracy 1.0, gave 6% and KTO
on thumbs nothing); that stage also learns from the answers users approved (filtered behaviour cloning) and from
best-of-k samples the reward model rates as highly as those (worker/sampling.py). Without edits it trains the same
SFT on approved answers and best-of-k picks (rejection sampling), which moved thumbs-only rounds further than `rl`;
with nothing to imitate, `rl` against a trusted reward model, else DPO on enough pairs, else KTO on thumbs. Each
can be asked for.

`rl` is on-policy RL against the run's reward model with TRL's GRPO (the maintained PPO-family trainer): for each
of the newest ``rl_prompts`` prompts users asked, the adapter samples ``rl_generations`` answers, the reward model
scores them and the no-collapse checks (worker/checks.py) take points off broken ones, and each answer is pushed
up or down by how it compares with its group. No KL pull toward the base by default (``rl_beta`` 0, TRL's default):
its reference pass took a fifth of a CPU run, and the no-collapse penalty and the gate guard against drift. A step
learns from ``batch_size * rl_generations`` answers, sampled ``rl_sample_steps`` steps' worth at once: about 40 s
a step on a 2-core CPU, a few seconds on a GPU.

The adapter is trained on the base model (or continues the production adapter) and saved in plain PEFT format,
which vLLM and LoRAX load unchanged. dtype and learning rate are set on purpose: TRL's CPU defaults (bf16, lr
1e-6) barely move a LoRA in the few steps a run takes (shared/probes/model-and-training.md).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from worker.data import TrainingData

log = logging.getLogger(__name__)
Algorithm = Literal["auto", "sft", "dpo", "kto", "rl"]
# SFT: 3e-4 for 3 epochs moved held-out answers more than 2e-4 for 2 (shared/probes/learning.md)
# RL (concise users, 128 thumbs, 48 held-out prompts, bench/loop.py's round 2 replayed): 5e-4 for 10 steps gave
# approval 4% -> 25%, on topic 1.00 -> 0.94; 1e-3 for 8 steps 4% -> 92% but on topic 0.88 and lists repeating one
# item; 7e-4 4% -> 65%, on topic 0.77. Safety first: 5e-4.
DEFAULT_LR = {"sft": 3e-4, "dpo": 5e-5, "kto": 5e-5, "rl": 5e-4}
# Points an rl answer loses per failed no-collapse check: more than the spread of the judge's scores within a group
# (std about 1.5), so an answer that breaks a check loses to a sound one the judge liked a little less.
COLLAPSE_PENALTY = 2.0


class NoUsableData(Exception):
    """The data has nothing the chosen algorithm can train on; the message says what is missing."""


class Cancelled(Exception):
    pass


@dataclass
class TrainConfig:
    algorithm: Algorithm = field(default="auto", metadata={"help": "sft, dpo, kto, auto (picks from the data), rl."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"),
                                            metadata={"help": "Modules that get a LoRA."})
    learning_rate: float | None = field(default=None, metadata={"help": "None: 3e-4 for SFT, 5e-5 for DPO/KTO, "
                                                                            "5e-4 for RL."})
    epochs: float = field(default=3.0, metadata={"help": "Passes over the training data."})
    max_steps: int | None = field(default=None, metadata={"help": "Steps per stage; overrides epochs and "
                                                                    "min_steps when set."})
    min_steps: int = field(default=40, metadata={"help": "Steps per stage at least (within max_epochs): a round of "
                                                         "a few edits still gets enough updates to move answers."})
    max_epochs: float = field(default=8.0, metadata={"help": "Passes min_steps may stretch to: a handful of rows "
                                                             "is not memorised."})
    # A replayed bullets round (bench/rl_replay.py, 14 edits, 32 steps): alpha 10 kept approval at 100% and raised
    # greedy answers not looping from 75% to 83%; lora_r 8 (alpha 16) gave 90% and 90%. On other preferences' rounds
    # (30% edits) lora_r 8 against 16: steps 75% vs 85%, formal 73% vs 83%, concise 65% vs 56% approval; so r 16
    # stays the default and neither NEFTune nor r 8 is on.
    neftune_noise_alpha: float | None = field(default=None, metadata={"help": "SFT: NEFTune's noise on the input "
                                                                                 "embeddings; None: none."})
    batch_size: int = field(default=4, metadata={"help": "Rows (pairs for DPO, prompts for RL) per step."})
    beta: float = field(default=0.1, metadata={"help": "DPO/KTO strength of the pull toward the reference."})
    rl_generations: int = field(default=4, metadata={"help": "RL: answers sampled per prompt, each judged against "
                                                             "its group."})
    rl_prompts: int = field(default=32, metadata={"help": "RL: the newest distinct prompts users asked that a run "
                                                          "samples answers to, in one pass."})
    rl_iterations: int = field(default=1, metadata={"help": "RL: optimizer steps on each batch of sampled answers "
                                                            "(GRPO's mu, clipped like PPO): 2 took a replayed round "
                                                            "to 46% approval against 25%, in 1.7x the time."})
    rl_sample_steps: int = field(default=4, metadata={"help": "RL: steps whose answers are sampled in one batch "
                                                              "(TRL's steps_per_generation; later steps learn from a "
                                                              "slightly older policy, clipped like PPO). A replayed "
                                                              "thumbs-only round, two seeds: 4 took 0.83-0.87x the "
                                                              "time of 1 at 10-12% approval against 4-8%; 8 learned "
                                                              "almost nothing."})
    rl_beta: float = field(default=0.0, metadata={"help": "RL: strength of the KL pull toward the base; 0 skips "
                                                          "the reference pass."})
    rl_max_new_tokens: int = field(default=128, metadata={"help": "RL: tokens per sampled answer; one cut off here "
                                                                  "counts as unfinished, as at the gate."})
    max_length: int = field(default=256, metadata={"help": "Tokens per row (prompt + answer), truncated beyond."})
    seed: int = field(default=0, metadata={"help": "Seed for data order and LoRA init."})
    start_from: Literal["base", "production"] = field(
        default="base", metadata={"help": "A fresh LoRA on the base, or continue the production adapter."})
    dtype: Literal["float32", "bfloat16"] = field(
        default="float32", metadata={"help": "float32 learns more per step here; bfloat16 is faster on AMX."})
    min_dpo_pairs: int = field(default=8, metadata={"help": "auto: DPO when there is nothing to imitate and at "
                                                            "least this many pairs."})
    min_kto_rows: int = field(default=4, metadata={"help": "auto: KTO when there are at least this many thumbs "
                                                           "and nothing to imitate."})
    sft_on_approved: bool = field(default=True, metadata={"help": "SFT also imitates answers users approved (thumb "
                                                                  "up, rating >= 4): filtered behaviour cloning."})

    def __post_init__(self) -> None:
        checks = {
            "algorithm": self.algorithm in ("auto", "sft", "dpo", "kto", "rl"),
            "lora_r": self.lora_r >= 1, "lora_alpha": self.lora_alpha >= 1, "lora_dropout": 0 <= self.lora_dropout < 1,
            "target_modules": bool(self.target_modules), "epochs": self.epochs > 0,
            "learning_rate": self.learning_rate is None or 0 < self.learning_rate < 1,
            "max_steps": self.max_steps is None or self.max_steps >= 1, "batch_size": self.batch_size >= 1,
            "min_steps": self.min_steps >= 1, "max_epochs": self.max_epochs > 0,
            "beta": self.beta > 0, "max_length": self.max_length >= 16, "rl_generations": self.rl_generations >= 2,
            "rl_prompts": self.rl_prompts >= 1, "rl_iterations": self.rl_iterations >= 1,
            "rl_sample_steps": self.rl_sample_steps >= 1, "rl_beta": self.rl_beta >= 0,
            "rl_max_new_tokens": self.rl_max_new_tokens >= 8,
            "start_from": self.start_from in ("base", "production"), "dtype": self.dtype in ("float32", "bfloat16"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            help_text = {f.name: f.metadata.get("help", "") for f in fields(self)}[bad[0]]
            raise ValueError(f"TrainConfig.{bad[0]}={getattr(self, bad[0])!r} is invalid: {help_text}")
        self.target_modules = tuple(self.target_modules)

    def as_dict(self) -> dict:
        return asdict(self)

    def steps(self, rows: int, batch_size: int) -> int:
        """Optimizer steps for a stage of ``rows`` rows: ``epochs`` passes, stretched toward ``min_steps``.

        What a small round lacks is updates, not rows: on a 64-vote round with 30% edits (bench/loop.py, concise
        users) 3 epochs gave held-out approval 4% -> 27%, 40 steps 4% -> 40%. 64 steps over-fitted: answers drifted
        off topic. ``max_epochs`` keeps a handful of approved answers from being memorised.
        """
        if self.max_steps:
            return self.max_steps
        per_epoch = math.ceil(rows / batch_size)
        return max(math.ceil(per_epoch * self.epochs), min(self.min_steps, math.floor(per_epoch * self.max_epochs)))


def sft_rows(config: TrainConfig, data: TrainingData) -> list[dict]:
    """What the SFT stage imitates: users' targets and best-of-k samples, one row per conversation."""
    return _one_per_conversation(user_targets(config, data) + list(data.best_of_k))


def user_targets(config: TrainConfig, data: TrainingData) -> list[dict]:
    """The answers users gave or approved, as SFT rows: edits, then approved answers, one row per conversation.

    An approved answer cut off at the token limit counts by its complete part (``complete_part``), and must then
    pass the no-collapse checks, as best-of-k picks do: a user who wants short answers approves short gibberish
    too: 4 of 25 in a thumbs-only benchmark round were off topic, and the candidate that imitated them answered 87%
    of the gate's prompts on topic against production's 100% (refused)."""
    from worker.checks import complete_part, neutral_checks
    from worker.sampling import last_user_turn

    rows = list(data.sft.train)
    if config.sft_on_approved:
        for r in data.kto.train:
            answer = complete_part(r["completion"][-1]["content"]) if r["label"] else ""
            if answer and all(neutral_checks(last_user_turn(r["prompt"]), answer).values()):
                rows.append({"messages": r["prompt"] + [{**r["completion"][-1], "content": answer}]})
    return _one_per_conversation(rows)


def _one_per_conversation(rows: list[dict]) -> list[dict]:
    unique = {json.dumps(r["messages"], sort_keys=True): r for r in rows}
    return list(unique.values())


def prompts_for_rl(config: TrainConfig, data: TrainingData) -> list[list[dict]]:
    """What RL samples answers to: the newest ``rl_prompts`` distinct contexts users asked in the training split."""
    from worker.sampling import newest_training_prompts

    return newest_training_prompts(data, config.rl_prompts)


def plan_stages(config: TrainConfig, data: TrainingData, trusted_judge: bool = False) -> list[str]:
    """Which trainers run, in order; NoUsableData if none can. ``trusted_judge``: the run has a reward model good
    enough to optimise (worker/evaluate.py GateConfig.trusts), which auto uses for rl."""
    sft, dpo, kto = len(sft_rows(config, data)), len(data.dpo.train), len(data.kto.train)
    if config.algorithm != "auto":
        available = {"sft": sft, "dpo": dpo, "kto": kto, "rl": len(prompts_for_rl(config, data))}[config.algorithm]
        minimum = 2 if config.algorithm == "kto" else 1
        if available < minimum:
            raise NoUsableData(f"{config.algorithm} needs at least {minimum} training rows, the feedback gives "
                               f"{available}")
        return [config.algorithm]
    # Users' edits say exactly what they wanted: imitating them and the approved answers moved a replayed 64-vote
    # round with 30% edits 4% -> 79% (bench/rl_replay.py, concise). Without edits, the approved answers with the
    # reward model's favourites of k samples per prompt (rejection sampling, worker/sampling.py) moved thumbs-only
    # rounds 4% -> 21% -> 46% (bench/loop.py), where rl on the same judge reached 8% in a replayed round; SFT on
    # the few approved answers alone looped and the gate refused it. rl trains when there is nothing to imitate.
    # A DPO stage after SFT pushed a round past 10 minutes on a 2-core CPU, and DPO alone barely moved answers in
    # shared/probes/learning.md: ask for it explicitly.
    if sft:
        return ["sft"]
    if trusted_judge and prompts_for_rl(config, data):
        return ["rl"]
    if dpo >= config.min_dpo_pairs:
        return ["dpo"]
    if kto >= config.min_kto_rows and len({row["label"] for row in data.kto.train}) == 2:
        return ["kto"]
    raise NoUsableData(f"no algorithm has enough data: {sft} answers to imitate (edits, approved answers), "
                       f"{dpo} pairs (DPO needs {config.min_dpo_pairs}), {kto} thumbs (KTO needs "
                       f"{config.min_kto_rows}, both labels)")


@dataclass
class TrainResult:
    stages: list[dict]
    seconds: float


Progress = Callable[[dict], None]


def train_adapter(config: TrainConfig, data: TrainingData, base_model: str, out_dir: Path,
                  on_progress: Progress = lambda p: None, stop: threading.Event | None = None,
                  parent_adapter: str | None = None, judge=None, deadline: float | None = None) -> TrainResult:
    """Train and save the adapter to ``out_dir``; Cancelled if ``stop`` is set, NoUsableData if nothing to learn.

    Once ``time.monotonic()`` passes ``deadline`` no further step or stage starts (at least one step is taken): the
    adapter trained so far is saved, its stage marked ``stopped_at_deadline``, and the gate judges it like any other.

    ``judge``: the run's RewardModel (worker/reward.py), which the rl stage optimises: pass it only when it is
    trustworthy enough for that (worker/evaluate.py GateConfig.trusts); auto then picks rl when there are no edits.
    """
    import datasets
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

    datasets.disable_progress_bars()
    stop = stop or threading.Event()
    stages = plan_stages(config, data, trusted_judge=judge is not None)
    if "rl" in stages and judge is None:
        raise NoUsableData("rl needs a reward model to optimise, and this run has none")
    started = time.monotonic()
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    peft_config = None
    if config.start_from == "production" and parent_adapter:
        model = PeftModel.from_pretrained(model, parent_adapter, is_trainable=True)
    else:
        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                 target_modules=list(config.target_modules), task_type="CAUSAL_LM")

    class Report(TrainerCallback):
        def __init__(self, stage: str):
            self.stage = stage

        def on_log(self, args, state, control, logs=None, **kwargs):
            elapsed = time.monotonic() - started
            done = state.global_step / max(state.max_steps, 1)
            on_progress({"stage": self.stage, "stages": stages, "step": state.global_step,
                         "total_steps": state.max_steps, "eta_s": round(elapsed / done - elapsed) if done else None,
                         **{k: v for k, v in (logs or {}).items() if isinstance(v, int | float)}})

        def on_step_end(self, args, state, control, **kwargs):
            if stop.is_set() or past_deadline():
                control.should_training_stop = True

    def past_deadline() -> bool:
        return deadline is not None and time.monotonic() > deadline

    results = []
    with tempfile.TemporaryDirectory(prefix="flywheel-train-") as scratch:
        for stage in stages:
            if results and past_deadline():
                break
            trainer = _trainer(stage, config, model, tokenizer, data, peft_config, scratch, datasets, judge)
            trainer.remove_callback(PrinterCallback)  # progress goes through on_progress, not stdout
            trainer.add_callback(Report(stage))
            trainer.train()
            if stop.is_set():
                raise Cancelled("the run was stopped")
            history = [h for h in trainer.state.log_history if "loss" in h]
            results.append({"algorithm": stage, "rows": len(trainer.train_dataset), "steps": trainer.state.global_step,
                            "first": history[0] if history else {}, "last": history[-1] if history else {},
                            **({"stopped_at_deadline": True, "planned_steps": trainer.state.max_steps}
                               if trainer.state.global_step < trainer.state.max_steps else {})})
            model, peft_config = trainer.model, None  # the next stage continues this adapter
    model.save_pretrained(out_dir, selected_adapters=["default"])
    return TrainResult(results, round(time.monotonic() - started, 1))


def _trainer(stage, config: TrainConfig, model, tokenizer, data: TrainingData, peft_config, scratch, datasets,
             judge=None):
    import torch
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    from worker.sampling import SAMPLE_TEMPERATURE

    batch_size = max(2, config.batch_size) if stage == "kto" else config.batch_size  # KTO's KL term needs a pair
    steps = None
    if stage == "sft":  # prompt/completion rows: the loss is on the answer only
        rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in sft_rows(config, data)]
    elif stage == "kto":
        rows = _interleaved(data.kto.train)
    elif stage == "rl":
        rows = [{"prompt": p} for p in prompts_for_rl(config, data)]
        # RL samples every answer it learns from: one pass over the prompts (rl_generations answers each) is its
        # budget, 8 steps and 5-6 minutes on a 2-core CPU at the defaults. TRL drops a sampling batch that
        # the prompts cannot fill, so a small round samples fewer prompts at once.
        batch_size = min(batch_size, len(rows))
        sample_steps = max(1, min(config.rl_sample_steps, len(rows) // batch_size))
        steps = config.max_steps or math.ceil(len(rows) / batch_size) * config.rl_iterations
    else:
        rows = data.dpo.train
    common = dict(
        output_dir=scratch, per_device_train_batch_size=batch_size,
        learning_rate=config.learning_rate or DEFAULT_LR[stage], max_steps=steps or config.steps(len(rows), batch_size),
        logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=not torch.cuda.is_available(), bf16=config.dtype == "bfloat16", gradient_checkpointing=False,
        lr_scheduler_type="constant", seed=config.seed, max_length=config.max_length, disable_tqdm=True,
    )
    if stage == "sft":
        trainer_class, args = SFTTrainer, SFTConfig(**common, neftune_noise_alpha=config.neftune_noise_alpha)
    elif stage == "dpo":
        trainer_class, args = DPOTrainer, DPOConfig(**common, beta=config.beta)
    elif stage == "rl":
        # A step takes batch_size prompts with rl_generations answers each; answers are bounded by their own length.
        del common["max_length"]
        common["per_device_train_batch_size"] = batch_size * config.rl_generations
        args = GRPOConfig(**common, beta=config.rl_beta, num_iterations=config.rl_iterations,
                          steps_per_generation=sample_steps, num_generations=config.rl_generations,
                          max_completion_length=config.rl_max_new_tokens, temperature=SAMPLE_TEMPERATURE, top_k=0,
                          top_p=1.0, shuffle_dataset=True)
        return GRPOTrainer(model=model, reward_funcs=rl_rewards(judge, tokenizer, model), args=args,
                           train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                           peft_config=peft_config)
    else:
        desirable = sum(r["label"] for r in rows)
        undesirable = len(rows) - desirable
        # TRL advises desirable_weight * n_desirable ~ undesirable_weight * n_undesirable
        weight = min(max(undesirable / desirable, 0.1), 10.0) if desirable and undesirable else 1.0
        trainer_class = KTOTrainer
        args = KTOConfig(**common, beta=config.beta, desirable_weight=weight, undesirable_weight=1.0)
    dataset = datasets.Dataset.from_list(rows)
    return trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)


def rl_rewards(judge, tokenizer, model) -> list:
    """GRPO's reward functions: the judge's score, and ``COLLAPSE_PENALTY`` off per failed no-collapse check (an
    unfinished, looping, empty or off-topic answer must not win its group because the judge liked its first words)."""
    from service.engine.weights import stop_token_ids
    from worker.checks import neutral_checks
    from worker.sampling import last_user_turn

    stop_ids = stop_token_ids(model, tokenizer)

    def judge_score(prompts, completions, **_):
        return judge.score(prompts, [c[-1]["content"] for c in completions])

    def no_collapse(prompts, completions, completion_ids, **_):
        return [-COLLAPSE_PENALTY * sum(not ok for ok in neutral_checks(last_user_turn(p), c[-1]["content"],
                                                                      bool(ids) and ids[-1] in stop_ids).values())
                for p, c, ids in zip(prompts, completions, completion_ids, strict=True)]

    return [judge_score, no_collapse]


def _interleaved(rows: list[dict]) -> list[dict]:
    """KTO estimates its KL term per batch: alternate labels so every batch holds both."""
    good = [r for r in rows if r["label"]]
    bad = [r for r in rows if not r["label"]]
    out = []
    for i in range(max(len(good), len(bad))):
        out.extend(x[i] for x in (good, bad) if i < len(x))
    return out
