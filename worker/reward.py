"""A reward model trained on the users' feedback: the judge for the gate's behaviour check and rejection sampling.

It scores a whole conversation (context + answer) with one number, higher for answers users prefer. It learns
with TRL's RewardTrainer (Bradley-Terry loss on chosen/rejected pairs) as a LoRA on a sequence-classification head
over the base model, from the rows the feedback export already makes (worker/data.py; no second exporter):
- pairs: edits (edited over original), comparisons, and an up over a down answer to the same context;
- thumbs (and ratings) as pointwise labels: each up-voted answer is paired with down-voted answers to *any*
  prompt. The pairwise loss over such pairs ranks approved answers above disapproved ones in absolute terms, which
  is what a judge comparing two adapters' answers needs; most real feedback is thumbs, so it must count.

Each trained model is a version under a root folder: ``<root>/<n>/`` (a PEFT adapter whose saved modules include
the score head) and ``<root>/<n>.json`` beside it with its held-out accuracy, counts and settings. The JSON is
written last: a folder without one is an interrupted run and is never loaded. The held-out rows are the worker's
held-out split, which no training row saw, and a further share of training prompts the judge sets aside
(``validation_split``). Everything loads from local paths only. This module serves nothing.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from service.feedback.export import prompt_key
from worker.data import Split, TrainingData, draw
from worker.train import Cancelled, NoUsableData

Conversation = list[dict]
Progress = Callable[[dict], None]


@dataclass
class RewardTrainConfig:
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"),
                                            metadata={"help": "Modules that get a LoRA; the score head is trained "
                                                              "in full."})
    learning_rate: float = field(default=2e-4, metadata={"help": "For the LoRA and the fresh score head."})
    epochs: float = field(default=2.0, metadata={"help": "Passes over the training pairs."})
    max_steps: int | None = field(default=None, metadata={"help": "Overrides epochs when set."})
    batch_size: int = field(default=4, metadata={"help": "Pairs per step (twice as many sequences)."})
    max_length: int = field(default=384, metadata={"help": "Tokens per conversation; longer ones lose their "
                                                           "middle."})
    validation_share: float = field(default=0.15, metadata={
        "help": "Share of the training prompts whose votes the judge sets aside to be measured on, besides the "
                "run's held-out split: a 64-vote round holds out too few thumbs to trust it (3 pairs)."})
    thumb_pairs: int = field(default=1, metadata={"help": "Opposite thumbs each thumb is paired with (1 already "
                                                          "uses every vote); 0 leaves thumbs out."})
    center_rewards: float = field(default=0.01, metadata={"help": "Pull toward mean-zero scores (TRL's "
                                                                  "center_rewards_coefficient); 0 to disable."})
    seed: int = field(default=0, metadata={"help": "Seed for the head's init, LoRA init and data order."})
    dtype: Literal["float32", "bfloat16"] = field(default="float32",
                                                  metadata={"help": "float32 learns more per step on CPU."})

    def __post_init__(self) -> None:
        checks = {"lora_r": self.lora_r >= 1, "lora_alpha": self.lora_alpha >= 1,
                  "target_modules": bool(self.target_modules), "learning_rate": 0 < self.learning_rate < 1,
                  "epochs": self.epochs > 0, "max_steps": self.max_steps is None or self.max_steps >= 1,
                  "batch_size": self.batch_size >= 1, "max_length": self.max_length >= 32,
                  "validation_share": 0 <= self.validation_share < 1, "thumb_pairs": self.thumb_pairs >= 0,
                  "center_rewards": self.center_rewards >= 0,
                  "dtype": self.dtype in ("float32", "bfloat16")}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            help_text = {f.name: f.metadata.get("help", "") for f in fields(self)}[bad[0]]
            raise ValueError(f"RewardTrainConfig.{bad[0]}={getattr(self, bad[0])!r} is invalid: {help_text}")
        self.target_modules = tuple(self.target_modules)


@dataclass
class RewardResult:
    version: int
    path: Path
    metrics: dict


def preference_rows(data: TrainingData, part: Literal["train", "heldout"], thumb_pairs: int) -> list[dict]:
    """``{"chosen": conversation, "rejected": conversation, "source": "pair" | "thumbs"}`` rows of one split.

    Thumb pairs are deterministic and use every vote: each down-voted answer meets ``thumb_pairs`` up-voted ones
    and each up-voted answer meets ``thumb_pairs`` down-voted ones (fewer when a side has fewer), spread evenly.
    """
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"], "source": "pair"}
            for r in getattr(data.dpo, part)]
    labelled = [(r["prompt"] + r["completion"], r["label"]) for r in getattr(data.kto, part)]
    ups = [c for c, label in labelled if label]
    downs = [c for c, label in labelled if not label]
    if not (thumb_pairs and ups and downs):
        return rows
    combos = [((d + j) % len(ups), d) for d in range(len(downs)) for j in range(min(thumb_pairs, len(ups)))]
    combos += [(u, (u + j) % len(downs)) for u in range(len(ups)) for j in range(min(thumb_pairs, len(downs)))]
    for u, d in dict.fromkeys(combos):
        if ups[u] != downs[d]:
            rows.append({"chosen": ups[u], "rejected": downs[d], "source": "thumbs"})
    return rows


def validation_split(data: TrainingData, share: float, thumb_pairs: int) -> TrainingData:
    """``data``'s pairs and thumbs as the judge splits them: the run's held-out rows, plus those of a further
    ``share`` of the training prompts (a stable draw by prompt, independent of the run's split), are what it is
    measured on; the rest is what it learns from. When that leaves the measured thumbs without one label, the next
    prompt in the draw with that label joins them (a share of each label, as in a stratified split). Unchanged when
    the draw would leave the judge nothing to learn from.

    A 64-vote thumbs-only round held out 4 thumbs (3 pairs): all ranked right, yet too few to trust the judge, so
    round 1 could not use it (bench/loop.py, seed 1); another (seed 2) held out and set aside no up-voted answer at
    all, so the judge could not be measured. Its 16 steps of 4 pairs see at most 64 pairs anyway."""
    def place(row: dict) -> int:
        return draw(prompt_key(row["prompt"]), salt="judge")

    aside = {prompt_key(r["prompt"]) for part in (data.dpo, data.kto) for r in part.train if place(r) < share * 10_000}
    for label in (True, False) if share else ():
        measured = any(r["label"] == label for r in data.kto.heldout) or any(
            r["label"] == label and prompt_key(r["prompt"]) in aside for r in data.kto.train)
        others = [r for r in data.kto.train if r["label"] == label and prompt_key(r["prompt"]) not in aside]
        if not measured and len({prompt_key(r["prompt"]) for r in others}) >= 2:  # one stays to learn from
            aside.add(prompt_key(min(others, key=place)["prompt"]))
    split = TrainingData(dpo=Split(**vars(data.dpo)), kto=Split(**vars(data.kto)))
    for part in (split.dpo, split.kto):
        part.heldout = part.heldout + [r for r in part.train if prompt_key(r["prompt"]) in aside]
        part.train = [r for r in part.train if prompt_key(r["prompt"]) not in aside]
    return split if preference_rows(split, "train", thumb_pairs) else data


def encode(tokenizer, conversation: Conversation, max_length: int) -> tuple[list[int], bool]:
    """Token ids through the chat template, as TRL tokenizes (and as the engine serves); (ids, truncated).

    A conversation over ``max_length`` keeps its start (the prompt) and its last quarter (where the answer ends
    and the score is read) and loses its middle, rather than being dropped as TRL would drop it.
    """
    ids = list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"])
    if len(ids) <= max_length:
        return ids, False
    tail = max_length // 4
    return ids[: max_length - tail] + ids[-tail:], True


def train_reward_model(config: RewardTrainConfig, data: TrainingData, base_model: str, root: Path,
                       on_progress: Progress = lambda p: None, stop: threading.Event | None = None) -> RewardResult:
    """Train on ``data``'s train split, measure on its held-out split and the share of training prompts it sets
    aside (``validation_split``), save the next version under ``root``."""
    import datasets
    import torch
    from peft import LoraConfig, TaskType
    from transformers import PrinterCallback, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    datasets.disable_progress_bars()
    stop = stop or threading.Event()
    data = validation_split(data, config.validation_share, config.thumb_pairs)
    train_rows = preference_rows(data, "train", config.thumb_pairs)
    if not train_rows:
        raise NoUsableData(f"a reward model needs pairs or both up and down thumbs; the feedback gives "
                           f"{len(data.dpo.train)} pairs and {len(data.kto.train)} thumbs")
    started = time.monotonic()
    torch.manual_seed(config.seed)  # the score head is initialised at random
    model, tokenizer = _load_classifier(base_model)
    tokenized, truncated = [], 0
    for row in train_rows:
        (chosen, cut_c), (rejected, cut_r) = (encode(tokenizer, row[k], config.max_length)
                                              for k in ("chosen", "rejected"))
        tokenized.append({"chosen_ids": chosen, "rejected_ids": rejected})
        truncated += cut_c or cut_r

    class Report(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            on_progress({"stage": "reward", "step": state.global_step, "total_steps": state.max_steps,
                         **{k: v for k, v in (logs or {}).items() if isinstance(v, int | float)}})

        def on_step_end(self, args, state, control, **kwargs):
            if stop.is_set():
                control.should_training_stop = True

    root.mkdir(parents=True, exist_ok=True)
    scratch = root / f".training-{uuid.uuid4().hex[:8]}"
    try:
        args = RewardConfig(
            output_dir=str(scratch / "trainer"), per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate, num_train_epochs=config.epochs, max_steps=config.max_steps or -1,
            logging_steps=1, report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(),
            bf16=config.dtype == "bfloat16", gradient_checkpointing=False, lr_scheduler_type="constant",
            seed=config.seed, max_length=None, disable_tqdm=True,
            center_rewards_coefficient=config.center_rewards or None)
        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                 target_modules=list(config.target_modules), task_type=TaskType.SEQ_CLS,
                                 modules_to_save=["score"])
        trainer = RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(tokenized),
                                processing_class=tokenizer, peft_config=peft_config)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(Report())
        trainer.train()
        if stop.is_set():
            raise Cancelled("the reward model run was stopped")
        trained = trainer.model.eval()
        heldout = preference_rows(data, "heldout", config.thumb_pairs)
        scorer = _Scorer(trained, tokenizer, config.max_length)
        history = [h for h in trainer.state.log_history if "loss" in h]
        metrics = {
            "base_model": base_model, "created_at": datetime.now(UTC).isoformat(), "config": asdict(config),
            "counts": {"train_pairs": sum(r["source"] == "pair" for r in train_rows),
                       "train_thumb_pairs": sum(r["source"] == "thumbs" for r in train_rows),
                       "heldout_pairs": sum(r["source"] == "pair" for r in heldout),
                       "heldout_thumb_pairs": sum(r["source"] == "thumbs" for r in heldout),
                       "truncated": truncated},
            "steps": trainer.state.global_step,
            "loss_first": history[0]["loss"] if history else None,
            "loss_last": history[-1]["loss"] if history else None,
            **scorer.heldout_metrics(heldout),
        }
        version = _next_version(root)
        trained.save_pretrained(scratch / "model")
        (scratch / "model").rename(root / str(version))
        metrics["seconds"] = round(time.monotonic() - started, 1)
        _write_json(root / f"{version}.json", {"version": version, **metrics})
        return RewardResult(version, root / str(version), {"version": version, **metrics})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class RewardModel:
    """A saved reward model, loaded for scoring: ``score(prompts, answers)`` -> one float per answer."""

    def __init__(self, path: Path, base_model: str | None = None, batch_size: int = 16):
        from peft import PeftModel

        self.path = Path(path)
        self.info = json.loads((self.path.parent / f"{self.path.name}.json").read_text())
        self.version: int = self.info["version"]
        self.heldout_accuracy: float | None = self.info.get("heldout_accuracy")
        model, tokenizer = _load_classifier(base_model or self.info["base_model"])
        model = PeftModel.from_pretrained(model, str(self.path), local_files_only=True)
        self.batch_size = batch_size
        from worker.sampling import device

        self._scorer = _Scorer(model.merge_and_unload().to(device()).eval(), tokenizer,
                               self.info["config"]["max_length"])

    @classmethod
    def latest(cls, root: Path, base_model: str | None = None) -> RewardModel | None:
        """The newest complete version under ``root``, or None when none was trained."""
        done = versions(root)
        return cls(root / str(done[-1]), base_model) if done else None

    def trusted(self, min_accuracy: float) -> bool:
        counts = self.info.get("counts", {})
        return confidently_above(self.heldout_accuracy, counts.get("heldout_pairs", 0)
                                 + counts.get("heldout_thumb_pairs", 0), min_accuracy)

    def score(self, prompts: Sequence[Conversation], answers: Sequence[str]) -> list[float]:
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers: give one answer per prompt")
        return self._scorer.score([[*p, {"role": "assistant", "content": a}] for p, a in zip(prompts, answers,
                                                                                               strict=True)],
                                  self.batch_size)


def confidently_above(accuracy: float | None, rows: int, minimum: float) -> bool:
    """Whether a held-out accuracy beats ``minimum`` with 95% confidence (its Wilson lower bound): 7 of 7 held-out
    pairs right clears 0.6 where 4 of 4 or 20 of 28 do not, so a judge is trusted on a few pairs only when it gets
    them all right (unmeasured never is)."""
    from service.feedback.stats import wilson_interval

    if accuracy is None or rows <= 0:
        return False
    return wilson_interval(round(accuracy * rows), rows)[0] >= minimum


def versions(root: Path) -> list[int]:
    """Complete versions under ``root`` (folder and JSON both present), oldest first."""
    if not root.is_dir():
        return []
    return sorted(int(p.stem) for p in root.glob("*.json") if p.stem.isdigit() and (root / p.stem).is_dir())


class _Scorer:
    """Batched scores of whole conversations, shortest first so that padding stays small."""

    def __init__(self, model, tokenizer, max_length: int):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    def score(self, conversations: list[Conversation], batch_size: int = 16) -> list[float]:
        import torch

        ids = [encode(self.tokenizer, c, self.max_length)[0] for c in conversations]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        scores = [0.0] * len(ids)
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                width = max(len(ids[i]) for i in batch)
                input_ids = torch.tensor([ids[i] + [pad] * (width - len(ids[i])) for i in batch])
                mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in batch])
                logits = self.model(input_ids=input_ids.to(self.model.device),
                                    attention_mask=mask.to(self.model.device)).logits[:, 0]
                for i, value in zip(batch, logits.float().tolist(), strict=True):
                    scores[i] = value
        return scores

    def heldout_metrics(self, rows: list[dict]) -> dict:
        """Share of held-out rows whose chosen side scores higher, overall and per source; None when none."""
        if not rows:
            return {"heldout_accuracy": None, "heldout_pair_accuracy": None, "heldout_thumb_accuracy": None,
                    "heldout_margin": None}
        chosen = self.score([r["chosen"] for r in rows])
        rejected = self.score([r["rejected"] for r in rows])
        right = [c > r for c, r in zip(chosen, rejected, strict=True)]

        def share(source: str) -> float | None:
            picked = [ok for ok, row in zip(right, rows, strict=True) if row["source"] == source]
            return round(sum(picked) / len(picked), 4) if picked else None

        return {"heldout_accuracy": round(sum(right) / len(right), 4), "heldout_pair_accuracy": share("pair"),
                "heldout_thumb_accuracy": share("thumbs"),
                "heldout_margin": round(sum(c - r for c, r in zip(chosen, rejected, strict=True)) / len(rows), 4)}


def _load_classifier(base_model: str):
    """The base model with a one-output score head, and its tokenizer; the head reads the last non-pad token."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(base_model, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with suppress_seqcls_warning():  # the head is new by design: trained next, or loaded from the saved version
        model = AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=1, dtype=torch.float32,
                                                                   local_files_only=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _next_version(root: Path) -> int:
    taken = [int(p.name.split(".")[0]) for p in root.iterdir() if p.name.split(".")[0].isdigit()]
    return max(taken, default=0) + 1


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    tmp.rename(path)
