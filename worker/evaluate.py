"""The offline gate: does a freshly trained adapter deserve to be served?

On the held-out split (prompts no training row saw) it measures preference accuracy: the share of pairs where the
adapter's log-likelihood margin against the base ranks the chosen answer over the rejected one (and, for thumbs,
where the margin's sign matches the label). It compares that with production's (or the base's, which scores 0:
its margin against itself is nil) and measures drift from the base as the mean per-token KL on fixed prompts.

Preference accuracy alone does not prove behaviour changed: DPO reached accuracy 1.0 on the default model while its
answers barely moved (shared/probes/learning.md). So the gate also looks at behaviour: candidate and production
answer prompts greedily, as users would be served: the held-out prompts users asked, plus a fixed set of everyday
prompts (``gate_prompts``). A 64-vote round holds out only 8-12 prompts, too few to see a drift off topic that the
benchmark saw on 48 (bench/loop.py); the fixed set makes every check count at least 40 answers (8 ask for lists or
steps: a bullets adapter looping on 19 points more of the benchmark's answers passed the gate without them, and with
them was refused, 7 of its 48 answers looping, 3 of them lists). Then
- the candidate must answer differently on at least ``min_changed`` of them (an adapter that changes nothing is
  not worth a rollout);
- no no-collapse check (worker/checks.py: not empty, on topic, not looping, finished) may pass on more than
  ``max_neutral_drop`` fewer of its answers than production's;
- when the run's reward model is trusted (held-out accuracy above ``min_judge_accuracy`` with 95% confidence), it
  must prefer the candidate's answers on at least ``min_win_rate`` of the prompts (ties count half);
- the candidate's preference accuracy must beat production's by ``min_gain``; when the trusted judge prefers its
  answers with 95% confidence (the Wilson lower bound of its win share above one half), it need only not be
  confidently worse on the held-out votes the two rank differently: the judge measured "better" on the answers
  themselves, and a few votes of 10-20 are noise;
- the candidate's answers to the fixed prompts must keep the operators' rules (``must`` / ``must_not`` regexes).
Every metric is returned whatever the verdict, to be stored on the adapter row and shown to operators. Greedy
answers are kept per model version (``answer_cache``): production's answers to the fixed prompts are generated once,
not at every gate.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from worker.checks import neutral_checks, pass_rates, with_relevance
from worker.data import TrainingData
from worker.reward import confidently_above
from worker.sampling import Answer, device, generate, last_user_turn, unique_prompts

# Fixed everyday prompts with plain reference answers: drift is measured on the same text for every candidate.
KL_PROMPTS = [
    ("How do I boil an egg?", "Put the egg in boiling water for about nine minutes, then cool it in cold water."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Give me a tip for sleeping better.", "Keep a regular bedtime and avoid screens for an hour before sleep."),
    ("What is 12 times 3?", "12 times 3 is 36."),
    ("Suggest a name for a goldfish.", "How about Bubbles?"),
    ("Why do we have seasons?", "Earth's tilted axis gives each hemisphere more direct sunlight part of the year."),
]


# Everyday prompts no benchmark user asks (bench/prompts.txt shares no topic with them). Operators replace the file
# (FLYWHEEL_GATE_PROMPTS) to add their own prompts and rules: one JSON object per line,
# {"prompt": str, "must": [regex], "must_not": [regex]}, the rules optional.
GATE_PROMPTS = Path(__file__).resolve().parent / "gate_prompts.jsonl"


@dataclass
class GateConfig:
    min_gain: float = 0.02  # preference accuracy the candidate must add over production
    max_kl: float = 1.0  # mean per-token KL from the base on KL_PROMPTS, in nats
    gate_prompts: Path | None = GATE_PROMPTS  # fixed prompts answered by both, with optional rules; None: none
    max_new_tokens: int = 128  # per greedy answer: enough for an everyday answer to finish
    behaviour_prompts: int = 32  # held-out prompts answered by candidate and production (besides gate_prompts)
    min_changed: float = 0.1  # share of those answers the candidate must change
    max_neutral_drop: float = 0.1  # largest fall in any no-collapse check's pass rate
    # held-out accuracy the reward model must beat with 95% confidence to judge: chance is 0.5
    min_judge_accuracy: float = 0.6
    min_win_rate: float = 0.55  # share of prompts where the judge must prefer the candidate (ties half)
    answer_cache: Path | None = None  # folder keeping each model version's greedy answers; None: none kept

    def trusts(self, judge) -> bool:
        """Whether the run's reward model may judge (and pick best-of-k answers)."""
        return judge is not None and judge.trusted(self.min_judge_accuracy)


@dataclass
class Verdict:
    passed: bool
    reasons: list[str]
    metrics: dict = field(default_factory=dict)


def evaluate(base_model: str, candidate: str, production: str | None, data: TrainingData, gate: GateConfig,
             judge=None, stop: threading.Event | None = None) -> Verdict:
    """``judge``: the run's RewardModel (worker/reward.py), used when it is trusted. ``stop`` set: Cancelled."""
    import torch
    from peft import PeftModel

    from service.engine.weights import load_pretrained

    started = time.monotonic()
    model, tokenizer = load_pretrained(base_model, device=device())
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
            ours = scorer.right("candidate", pairs, labelled)
            theirs = scorer.right("production", pairs, labelled) if production else [False] * len(ours)
            metrics["candidate_accuracy"] = sum(ours) / len(ours)
            metrics["production_accuracy"] = sum(theirs) / len(theirs)
            metrics["candidate_only_right"] = sum(o and not t for o, t in zip(ours, theirs, strict=True))
            metrics["production_only_right"] = sum(t and not o for o, t in zip(ours, theirs, strict=True))
        metrics["kl_from_base"] = scorer.mean_kl("candidate")
        heldout = unique_prompts(data.dpo.heldout + data.sft.heldout + data.kto.heldout, gate.behaviour_prompts)
        cases = load_gate_prompts(gate.gate_prompts) if gate.gate_prompts else []
        prompts = heldout + [[{"role": "user", "content": c["prompt"]}] for c in cases]
        failures = []
        if prompts:
            versions = {"base": base_model, "candidate": candidate, "production": production}
            measured, answers = behaviour(model, tokenizer, prompts, versions, gate, judge, stop)
            metrics.update(measured, heldout_behaviour_prompts=len(heldout))
            failures = rule_failures(cases, answers[len(heldout):])
    metrics.update(rule_failures=failures, gate_seconds=round(time.monotonic() - started, 1))
    served = "production" if production else "the base"
    reasons = preference_reasons(metrics, gate, served) if pairs or labelled else [
        "no held-out feedback to measure the candidate on"]
    if metrics["kl_from_base"] > gate.max_kl:
        reasons.append(f"drifts {metrics['kl_from_base']:.3f} nats/token from the base (max {gate.max_kl})")
    if failures:
        reasons.append(f"{len(failures)} gate prompt(s) broke their rules")
    reasons += behaviour_reasons(metrics, gate, served)
    return Verdict(not reasons, reasons, metrics)


def preference_reasons(metrics: dict, gate: GateConfig, served: str) -> list[str]:
    """Whether the candidate ranks held-out feedback better than ``served``: by ``min_gain``, or, when the trusted
    reward model prefers its answers with 95% confidence, at least not confidently worse (``served`` right on more
    of the rows where the two disagree, with 95% confidence).

    SFT on the judge's picks moves answers more than this likelihood ranking of 10-20 held-out votes: a thumbs-only
    round 2 whose answers the judge preferred on 81% of the prompts ranked them exactly as production did (0.59) and
    was refused; another, preferred on 77% of 47 prompts and finishing 96% of its answers against 60%, ranked 11 of
    19 votes right against production's 13 and was refused by a fixed 0.02 margin (bench/loop.py, concise; the
    second is seed 2). A plain win share is not enough to waive the gain: one of 57% (Wilson lower bound about
    0.42) promoted an adapter that left held-out approval where it was."""
    ours, theirs = metrics["candidate_accuracy"], metrics["production_accuracy"]
    if judge_confident(metrics):
        gained, lost = metrics.get("candidate_only_right", 0), metrics.get("production_only_right", 0)
        if lost > gained and confidently_above(lost / (gained + lost), gained + lost, 0.5):
            return [f"held-out preference accuracy {ours:.3f} against {served}'s ({theirs:.3f}): {served} ranks "
                    f"{lost} of the {gained + lost} votes they disagree on right, confidently more than half"]
        return []
    if ours < theirs + gate.min_gain:
        return [f"held-out preference accuracy {ours:.3f} does not beat {served}'s ({theirs:.3f}) by {gate.min_gain}"]
    return []


def judge_confident(metrics: dict) -> bool:
    """Whether the trusted judge preferred the candidate's answers on more than half the prompts, with 95%
    confidence (ties count half)."""
    win = metrics.get("judge_win_rate")
    return win is not None and confidently_above(win, metrics.get("behaviour_prompts", 0), 0.5)


def behaviour(model, tokenizer, prompts: list[list[dict]], versions: dict[str, str | None], gate: GateConfig,
              judge, stop: threading.Event | None = None) -> tuple[dict, list]:
    """Greedy answers of candidate and production (or the base) to ``prompts``, compared; (metrics, candidate's).

    ``versions``: the adapter folder of "candidate" and of "production" (None: the base serves)."""
    def greedy(adapter: str | None):
        cache = gate.answer_cache / f"{version_key(versions['base'], adapter)}.json" if gate.answer_cache else None
        return cached_greedy(model, tokenizer, prompts, gate.max_new_tokens, cache, stop)

    model.set_adapter("candidate")
    candidate = greedy(versions["candidate"])
    if versions["production"]:
        model.set_adapter("production")
        served = greedy(versions["production"])
    else:
        with model.disable_adapter():
            served = greedy(None)
    questions = [last_user_turn(p) for p in prompts]

    def rates(answers) -> dict[str, float]:
        checked = [neutral_checks(q, a.text, a.finished) for q, a in zip(questions, answers, strict=True)]
        with model.disable_adapter():  # relevance as the base sees it, the same instrument every round
            return pass_rates(with_relevance(model, tokenizer, questions, [a.text for a in answers], checked))

    checked = {"candidate": rates(candidate), "production": rates(served)}
    out = {"behaviour_prompts": len(prompts),
           "changed_share": round(sum(c.text != s.text for c, s in zip(candidate, served, strict=True))
                                  / len(prompts), 4),
           "neutral_candidate": checked["candidate"], "neutral_production": checked["production"],
           "mean_words": {"candidate": _mean_words(candidate), "production": _mean_words(served)},
           "examples": [{"prompt": q, "candidate": c.text[:400], "production": s.text[:400]}
                        for q, c, s in list(zip(questions, candidate, served, strict=True))[:3]]}
    if judge is not None:
        out.update(judge_version=judge.version, judge_accuracy=judge.heldout_accuracy)
        if gate.trusts(judge):
            ours = judge.score(prompts, [a.text for a in candidate])
            theirs = judge.score(prompts, [a.text for a in served])
            wins = sum((o > t) + 0.5 * (o == t) for o, t in zip(ours, theirs, strict=True))
            out["judge_win_rate"] = round(wins / len(prompts), 4)
            out["judge_margin"] = round(sum(o - t for o, t in zip(ours, theirs, strict=True)) / len(prompts), 4)
    return out, candidate


def behaviour_reasons(metrics: dict, gate: GateConfig, served: str) -> list[str]:
    """Why the candidate's answers do not deserve a rollout; empty when they do (or were not measured)."""
    n = metrics.get("behaviour_prompts")
    if not n:
        return []
    reasons = []
    if metrics["changed_share"] < gate.min_changed:
        reasons.append(f"changes no behaviour: its greedy answers to {n} prompts differ from {served}'s on "
                       f"{metrics['changed_share']:.0%} (at least {gate.min_changed:.0%} needed)")
    for check, rate in metrics["neutral_candidate"].items():
        # Counted on the gate prompts too (40 by default), one odd answer is under 3 points: a fall beyond the limit is
        # a trend, the one bench/loop.py counts as a collapse.
        if metrics["neutral_production"][check] - rate > gate.max_neutral_drop + 1e-9:
            reasons.append(f"collapse check '{check}' passes on {rate:.0%} of its {n} answers against "
                           f"{metrics['neutral_production'][check]:.0%} for {served} (at most "
                           f"{gate.max_neutral_drop:.0%} fewer allowed)")
    if metrics.get("judge_win_rate") is not None and metrics["judge_win_rate"] < gate.min_win_rate:
        reasons.append(f"the reward model (v{metrics['judge_version']}, held-out accuracy "
                       f"{metrics['judge_accuracy']:.2f}) prefers its answers on {metrics['judge_win_rate']:.0%} of "
                       f"{n} prompts (at least {gate.min_win_rate:.0%} needed)")
    return reasons


def version_key(base_model: str, adapter: str | None) -> str:
    """Names one model version: the base's path and the adapter's checksum (its files, not its folder's name)."""
    from service.adapters.files import adapter_digest

    return hashlib.sha256(f"{base_model}\0{adapter_digest(adapter)[0] if adapter else ''}".encode()).hexdigest()[:32]


def cached_greedy(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, cache: Path | None,
                  stop: threading.Event | None = None) -> list:
    """Greedy answers of the active adapter, generated only for prompts ``cache`` (a JSON file) lacks.

    Production answers the fixed gate prompts (and the held-out prompts of earlier rounds) run after run, and a
    promoted candidate already answered them at its own gate: keeping them saves most of a gate's generation on a
    CPU. An unreadable cache counts as empty."""
    try:
        kept = json.loads(cache.read_text()) if cache and cache.exists() else {}
    except (OSError, ValueError):
        kept = {}
    if not isinstance(kept, dict):
        kept = {}
    keys = [json.dumps([p, max_new_tokens], sort_keys=True) for p in prompts]
    missing = [i for i, k in enumerate(keys) if not isinstance(kept.get(k), dict) or
               not isinstance(kept[k].get("text"), str)]
    if missing:
        answers = generate(model, tokenizer, [prompts[i] for i in missing], max_new_tokens=max_new_tokens, stop=stop)
        kept.update({keys[i]: {"text": a[0].text, "finished": a[0].finished} for i, a in zip(missing, answers,
                                                                                             strict=True)})
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            scratch = cache.with_suffix(".tmp")
            scratch.write_text(json.dumps(kept))
            scratch.replace(cache)  # atomic: a killed gate leaves the old file or the new one
    return [Answer(kept[k]["text"], bool(kept[k]["finished"])) for k in keys]


def _mean_words(answers) -> float:
    return round(sum(len(a.text.split()) for a in answers) / len(answers), 1)


def load_gate_prompts(path: Path) -> list[dict]:
    """The gate prompts file's cases; ValueError naming the line when one is not a case."""
    cases = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            case = json.loads(line)
            ok = isinstance(case, dict) and isinstance(case.get("prompt"), str) and case["prompt"].strip() and all(
                isinstance(case.get(k, []), list) and all(re.compile(p) for p in case.get(k, []))
                for k in ("must", "must_not"))
        except (ValueError, TypeError, re.error) as exc:
            raise ValueError(f"{path}:{number}: {exc}") from exc
        if not ok:
            raise ValueError(f'{path}:{number}: expected {{"prompt": str, "must": [regex], "must_not": [regex]}}')
        cases.append(case)
    return cases


def rule_failures(cases: list[dict], answers: list) -> list[dict]:
    """The cases whose answer misses a ``must`` pattern or matches a ``must_not`` one (case-insensitive)."""
    failures = []
    for case, generated in zip(cases, answers, strict=True):
        answer = generated.text
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

    def right(self, adapter: str, pairs: list[tuple], labelled: list[tuple]) -> list[bool]:
        """Per held-out row, whether ``adapter`` ranks it as the user did: the pairs, then the thumbs."""
        out = [self.margin(adapter, p, chosen) > self.margin(adapter, p, rejected) for p, chosen, rejected in pairs]
        # A thumb counts when the margin has the label's sign; a zero margin (the base itself) never does.
        for p, answer, label in labelled:
            m = self.margin(adapter, p, answer)
            out.append(m > 0 if label else m < 0)
        return out

    def mean_kl(self, adapter: str) -> float:
        total, tokens = 0.0, 0
        for question, answer in KL_PROMPTS:
            ids, start = self._ids([{"role": "user", "content": question}], answer)
            adapted = self._logits(adapter, ids)[0, start - 1:-1].log_softmax(-1)
            base = self._logits(None, ids)[0, start - 1:-1].log_softmax(-1)
            total += float((adapted.exp() * (adapted - base)).sum())
            tokens += adapted.shape[0]
        return total / tokens
