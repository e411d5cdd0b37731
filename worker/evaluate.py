"""The offline gate: does a freshly trained adapter deserve to be served?

On the held-out split (prompts no training row saw) it measures preference accuracy: the share of pairs where the
adapter's log-likelihood margin against the base ranks the chosen answer over the rejected one (and, for thumbs,
where the margin's sign matches the label). It compares that with production's (or the base's, which scores 0:
its margin against itself is nil), measures drift from the base as the mean per-token KL on fixed prompts, and runs
the operators' regression prompts. Every metric is returned whatever the verdict, to be stored on the adapter row.
Preference accuracy alone does not prove behaviour changed (shared/probes/learning.md); the behavioural check with
a reward model belongs to the reward-model work.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from worker.data import TrainingData

# Fixed everyday prompts with plain reference answers: drift is measured on the same text for every candidate.
KL_PROMPTS = [
    ("How do I boil an egg?", "Put the egg in boiling water for about nine minutes, then cool it in cold water."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Give me a tip for sleeping better.", "Keep a regular bedtime and avoid screens for an hour before sleep."),
    ("What is 12 times 3?", "12 times 3 is 36."),
    ("Suggest a name for a goldfish.", "How about Bubbles?"),
    ("Why do we have seasons?", "Earth's tilted axis gives each hemisphere more direct sunlight part of the year."),
]


@dataclass
class GateConfig:
    min_gain: float = 0.02  # preference accuracy the candidate must add over production
    max_kl: float = 1.0  # mean per-token KL from the base on KL_PROMPTS, in nats
    regression_prompts: Path | None = None  # JSONL: {"prompt": str, "must": [regex], "must_not": [regex]}
    max_new_tokens: int = 64


@dataclass
class Verdict:
    passed: bool
    reasons: list[str]
    metrics: dict = field(default_factory=dict)


def evaluate(base_model: str, candidate: str, production: str | None, data: TrainingData, gate: GateConfig) -> Verdict:
    import torch
    from peft import PeftModel

    from service.engine.weights import load_pretrained

    model, tokenizer = load_pretrained(base_model)
    model = PeftModel.from_pretrained(model, candidate, adapter_name="candidate")
    if production:
        model.load_adapter(production, adapter_name="production")
    model.eval()
    scorer = _Scorer(model, tokenizer)
    with torch.inference_mode():
        pairs = [(r["prompt"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in data.dpo.heldout]
        labelled = [(r["prompt"], r["completion"][0]["content"], r["label"]) for r in data.kto.heldout]
        metrics = {"heldout_pairs": len(pairs), "heldout_thumbs": len(labelled)}
        if pairs or labelled:
            metrics["candidate_accuracy"] = scorer.accuracy("candidate", pairs, labelled)
            metrics["production_accuracy"] = scorer.accuracy("production", pairs, labelled) if production else 0.0
        metrics["kl_from_base"] = scorer.mean_kl("candidate")
        failures = run_regressions(scorer, gate) if gate.regression_prompts else []
    metrics["regression_failures"] = failures
    reasons = []
    if not (pairs or labelled):
        reasons.append("no held-out feedback to measure the candidate on")
    elif metrics["candidate_accuracy"] < metrics["production_accuracy"] + gate.min_gain:
        reasons.append(f"held-out preference accuracy {metrics['candidate_accuracy']:.3f} does not beat "
                       f"{'production' if production else 'the base'} ({metrics['production_accuracy']:.3f}) "
                       f"by {gate.min_gain}")
    if metrics["kl_from_base"] > gate.max_kl:
        reasons.append(f"drifts {metrics['kl_from_base']:.3f} nats/token from the base (max {gate.max_kl})")
    if failures:
        reasons.append(f"{len(failures)} regression prompt(s) failed")
    return Verdict(not reasons, reasons, metrics)


def run_regressions(scorer: _Scorer, gate: GateConfig) -> list[dict]:
    failures = []
    for line in Path(gate.regression_prompts).read_text().splitlines():
        if not line.strip():
            continue
        case = json.loads(line)
        answer = scorer.generate("candidate", case["prompt"], gate.max_new_tokens)
        missing = [p for p in case.get("must", []) if not re.search(p, answer, re.IGNORECASE)]
        forbidden = [p for p in case.get("must_not", []) if re.search(p, answer, re.IGNORECASE)]
        if missing or forbidden:
            failures.append({"prompt": case["prompt"], "answer": answer, "missing": missing, "forbidden": forbidden})
    return failures


class _Scorer:
    """Log-likelihoods of answers under an adapter (or the base, adapter None) of one PeftModel."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self._base_cache: dict[tuple, float] = {}

    def _ids(self, prompt: list[dict], answer: str):
        import torch

        prompt_ids = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False)
        full = self.tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}],
                                                  tokenize=True, return_dict=False)
        prompt_ids = list(prompt_ids["input_ids"] if isinstance(prompt_ids, dict) else prompt_ids)
        full = list(full["input_ids"] if isinstance(full, dict) else full)
        return torch.tensor([full], device=self.model.device), len(prompt_ids)

    def _logits(self, adapter: str | None, ids):
        if adapter is None:
            with self.model.disable_adapter():
                return self.model(input_ids=ids).logits
        self.model.set_adapter(adapter)
        return self.model(input_ids=ids).logits

    def logprob(self, adapter: str | None, prompt: list[dict], answer: str) -> float:
        key = (json.dumps(prompt), answer)
        if adapter is None and key in self._base_cache:
            return self._base_cache[key]
        ids, start = self._ids(prompt, answer)
        logp = self._logits(adapter, ids)[0, start - 1:-1].log_softmax(-1)
        total = float(logp.gather(-1, ids[0, start:, None]).sum())
        if adapter is None:
            self._base_cache[key] = total
        return total

    def margin(self, adapter: str, prompt: list[dict], answer: str) -> float:
        return self.logprob(adapter, prompt, answer) - self.logprob(None, prompt, answer)

    def accuracy(self, adapter: str, pairs: list[tuple], labelled: list[tuple]) -> float:
        wins = sum(self.margin(adapter, p, chosen) > self.margin(adapter, p, rejected) for p, chosen, rejected in pairs)
        # A thumb counts when the margin has the label's sign; a zero margin (the base itself) never does.
        for p, answer, label in labelled:
            m = self.margin(adapter, p, answer)
            wins += m > 0 if label else m < 0
        return wins / (len(pairs) + len(labelled))

    def mean_kl(self, adapter: str) -> float:
        total, tokens = 0.0, 0
        for question, answer in KL_PROMPTS:
            ids, start = self._ids([{"role": "user", "content": question}], answer)
            adapted = self._logits(adapter, ids)[0, start - 1:-1].log_softmax(-1)
            base = self._logits(None, ids)[0, start - 1:-1].log_softmax(-1)
            total += float((adapted.exp() * (adapted - base)).sum())
            tokens += adapted.shape[0]
        return total / tokens

    def generate(self, adapter: str, prompt: str, max_new_tokens: int) -> str:
        self.model.set_adapter(adapter)
        inputs = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                    return_tensors="pt", return_dict=True).to(self.model.device)
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
