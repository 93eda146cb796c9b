"""Recipe and argument dataclasses for QAT: one YAML file = flat ``TrainingArguments`` keys plus
nested blocks ``quant``, ``lora``, ``distill``, ``ptq``, ``data``, ``selfgen``, ``eval``, ``export``.

Every block is validated when it is built; an unknown key is refused with the nearest valid name
and a bad value with the field, the value and what is allowed. ``--override key=value`` edits a
recipe before validation (dotted paths for blocks: ``lora.r=8``; values are parsed as YAML).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from qft.spec import QuantSpec, resolve_spec
from qft.train.confidence import CONFIDENCE_DEFS
from qft.train.lora import LORA_MODES, QPARAM_MODES

BLOCKS = ("quant", "lora", "distill", "ptq", "data", "selfgen", "eval", "export")
TOP_KEYS = ("model", "output_dir", "seed", "time_budget_s", "probe_steps", "time_limit_s")
PTQ_INIT = ("rtn", "clip")
STAGES = ("fp", "rtn", "init", "before_merge", "after_merge")


class RecipeError(ValueError):
    """A recipe key or value that is not allowed."""


def _bad(where, name, value, allowed):
    raise RecipeError(f"{where}.{name}={value!r} is not valid; allowed: {allowed}")


def unknown_key(where: str, key: str, known) -> RecipeError:
    near = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return RecipeError(f"{where}: unknown key {key!r}{hint}; allowed: {', '.join(sorted(known))}")


def _from_dict(cls, d: dict | None, where: str):
    d = dict(d or {})
    known = {f.name for f in fields(cls)}
    for k in d:
        if k not in known:
            raise unknown_key(where, k, known)
    return cls(**d)


def _is_int(v, lo=None):
    return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)


@dataclass
class LoraArgs:
    mode: str = field(default="lora-in-quantizer", metadata={"help": f"{' | '.join(LORA_MODES)}"})
    r: int = field(default=16, metadata={"help": "LoRA rank"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (qlora mode only)"})
    target_modules: list | None = field(default=None, metadata={"help": "module names (suffixes); None = every QuantLinear"})
    qparams: str = field(default="dynamic", metadata={
        "help": f"lora-in-quantizer quantization parameters: {' | '.join(QPARAM_MODES)}"})

    def __post_init__(self):
        if self.mode not in LORA_MODES:
            _bad("lora", "mode", self.mode, " | ".join(LORA_MODES))
        if not _is_int(self.r, 1):
            _bad("lora", "r", self.r, "a positive integer")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            _bad("lora", "alpha", self.alpha, "a positive number")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            _bad("lora", "dropout", self.dropout, "a number in [0, 1)")
        if self.qparams not in QPARAM_MODES:
            _bad("lora", "qparams", self.qparams, " | ".join(QPARAM_MODES))
        if self.target_modules is not None and (not isinstance(self.target_modules, list)
                                                or not all(isinstance(t, str) for t in self.target_modules)):
            _bad("lora", "target_modules", self.target_modules, "null or a list of module names")


@dataclass
class DistillArgs:
    loss: str = field(default="cakld", metadata={"help": "ce | forward_kl | reverse_kl | jsd | cakld (qft.registry.LOSSES)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of both distributions"})
    beta: float = field(default=0.5, metadata={"help": "jsd: mixture weight (0 = forward KL, 1 = reverse KL)"})
    confidence: float | None = field(default=None, metadata={"help": "cakld: fixed g in [0, 1]; null = estimate"})
    confidence_def: str = field(default="top1", metadata={"help": f"cakld: {' | '.join(CONFIDENCE_DEFS)}"})
    confidence_batches: int = field(default=4, metadata={"help": "cakld: batches used to estimate g before training"})
    ce_weight: float = field(default=0.0, metadata={"help": "add this times cross-entropy on the data"})
    hidden_weight: float = field(default=0.0, metadata={"help": "add this times hidden_mse on all hidden states (OneBit)"})

    def __post_init__(self):
        from qft.registry import LOSSES
        if self.loss not in LOSSES or self.loss == "hidden_mse":
            _bad("distill", "loss", self.loss, " | ".join(n for n in LOSSES.names() if n != "hidden_mse"))
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            _bad("distill", "temperature", self.temperature, "a positive number")
        if not isinstance(self.beta, (int, float)) or not 0 <= self.beta <= 1:
            _bad("distill", "beta", self.beta, "a number in [0, 1]")
        if self.confidence is not None and (not isinstance(self.confidence, (int, float)) or not 0 <= self.confidence <= 1):
            _bad("distill", "confidence", self.confidence, "null (estimate) or a number in [0, 1]")
        if self.confidence_def not in CONFIDENCE_DEFS:
            _bad("distill", "confidence_def", self.confidence_def, " | ".join(CONFIDENCE_DEFS))
        if not _is_int(self.confidence_batches, 1):
            _bad("distill", "confidence_batches", self.confidence_batches, "a positive integer")
        for k in ("ce_weight", "hidden_weight"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or v < 0:
                _bad("distill", k, v, "a number >= 0")

    def loss_options(self) -> dict:
        opts = {"temperature": self.temperature}
        if self.loss == "jsd":
            opts["beta"] = self.beta
        return opts


@dataclass
class PtqArgs:
    method: str = field(default="rtn", metadata={"help": "initial quantization of the student: rtn | clip"})
    options: dict = field(default_factory=dict, metadata={"help": "method options (clip: n_grid, max_shrink, rounds)"})
    calib_samples: int = field(default=16, metadata={"help": "calibration sequences (taken from the training data)"})
    calib_text: str | None = field(default=None, metadata={"help": "calibrate on windows of this text file instead"})

    def __post_init__(self):
        if self.method not in PTQ_INIT:
            _bad("ptq", "method", self.method, " | ".join(PTQ_INIT))
        if not isinstance(self.options, dict):
            _bad("ptq", "options", self.options, "a mapping of method options")
        if not _is_int(self.calib_samples, 1):
            _bad("ptq", "calib_samples", self.calib_samples, "a positive integer")


@dataclass
class SelfGenArgs:
    n: int = field(default=64, metadata={"help": "self-generated training sequences (used when data.sources is empty)"})
    seq_len: int = field(default=128, metadata={"help": "tokens per self-generated sequence"})
    batch_size: int = field(default=16, metadata={"help": "sequences decoded together"})
    seed: int = field(default=0, metadata={"help": "generation seed"})

    def __post_init__(self):
        for k in ("n", "seq_len", "batch_size"):
            if not _is_int(getattr(self, k), 2 if k == "seq_len" else 1):
                _bad("selfgen", k, getattr(self, k), "a positive integer")


@dataclass
class EvalArgs:
    texts: list = field(default_factory=list, metadata={"help": "text files to measure perplexity / KL on"})
    seq_len: int = field(default=512, metadata={"help": "tokens per evaluation window"})
    n_windows: int = field(default=20, metadata={"help": "windows per text file"})
    heldout: int = field(default=8, metadata={"help": "held-out self-generated sequences (0 = none)"})
    heldout_len: int = field(default=256, metadata={"help": "tokens per held-out sequence"})
    heldout_seed: int = field(default=1234, metadata={"help": "seed of the held-out text (differs from training)"})
    stages: list = field(default_factory=lambda: list(STAGES), metadata={
        "help": "which models to evaluate: fp, rtn (round-to-nearest baseline), init (ptq.method), before_merge, "
                "after_merge"})
    train_eval: int = field(default=16, metadata={
        "help": "with eval_strategy steps/epoch: training sequences held out for the eval loss during training"})
    generate: list = field(default_factory=lambda: ["The capital of France is"], metadata={
        "help": "prompts to continue with the exported model"})

    def __post_init__(self):
        if isinstance(self.texts, str):
            self.texts = [self.texts]
        for t in self.texts:
            if not Path(t).is_file():
                _bad("eval", "texts", t, "existing text files")
        for k in ("seq_len", "n_windows"):
            if not _is_int(getattr(self, k), 2 if k == "seq_len" else 1):
                _bad("eval", k, getattr(self, k), "a positive integer")
        if not _is_int(self.heldout, 0):
            _bad("eval", "heldout", self.heldout, "an integer >= 0")
        if not isinstance(self.stages, list):
            _bad("eval", "stages", self.stages, f"a list of {', '.join(STAGES)}")
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            _bad("eval", "stages", bad, f"a list of {', '.join(STAGES)}")
        if not _is_int(self.train_eval, 1):
            _bad("eval", "train_eval", self.train_eval, "a positive integer")


@dataclass
class ExportArgs:
    enabled: bool = field(default=True, metadata={"help": "export the merged model with qft.export.save"})
    format: str | None = field(default=None, metadata={"help": "pack-quantized | gptq | qft (default: the spec's)"})


@dataclass
class Recipe:
    model: str = "smollm2-135m"
    output_dir: str = "runs/qat"
    seed: int = 0
    quant: QuantSpec = field(default_factory=lambda: resolve_spec("w4g64"))
    lora: LoraArgs = field(default_factory=LoraArgs)
    distill: DistillArgs = field(default_factory=DistillArgs)
    ptq: PtqArgs = field(default_factory=PtqArgs)
    data: dict = field(default_factory=dict)
    selfgen: SelfGenArgs = field(default_factory=SelfGenArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    export: ExportArgs = field(default_factory=ExportArgs)
    train: dict = field(default_factory=dict)  # flat TrainingArguments keys
    time_budget_s: float = 0.0  # > 0: max_steps from a timing probe so training takes about this long
    probe_steps: int = 8  # optimizer steps of that probe (the first two are warm-up)
    time_limit_s: float = 0.0  # > 0: hard cap, training stops after the step that crosses it (then merge/export/eval)

    def __post_init__(self):
        if not isinstance(self.time_budget_s, (int, float)) or isinstance(self.time_budget_s, bool) \
                or self.time_budget_s < 0:
            _bad("recipe", "time_budget_s", self.time_budget_s, "seconds of training >= 0 (0 = use max_steps)")
        if not isinstance(self.time_limit_s, (int, float)) or isinstance(self.time_limit_s, bool) \
                or self.time_limit_s < 0:
            _bad("recipe", "time_limit_s", self.time_limit_s, "seconds of training >= 0 (0 = no hard cap)")
        if not _is_int(self.probe_steps, 3):
            _bad("recipe", "probe_steps", self.probe_steps, "an integer >= 3")

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        from transformers import TrainingArguments
        if not isinstance(d, dict):
            raise RecipeError(f"a recipe is a mapping of keys; got {type(d).__name__}")
        targs = {f.name for f in fields(TrainingArguments) if f.init}
        known = set(BLOCKS) | set(TOP_KEYS) | targs
        top, train, blocks = {}, {}, {}
        for k, v in d.items():
            if k in BLOCKS:
                blocks[k] = v
            elif k in TOP_KEYS:
                top[k] = v
            elif k in targs:
                train[k] = v
            else:
                raise unknown_key("recipe", k, known)
        if "output_dir" in train:
            top["output_dir"] = train.pop("output_dir")
        q = blocks.get("quant", "w4g64")
        try:
            quant = resolve_spec(q)
        except ValueError as e:
            raise RecipeError(f"quant: {e}") from None
        data = blocks.get("data") or {}
        if not isinstance(data, dict):
            _bad("recipe", "data", data, "a mapping (qft.train.data.DataConfig fields)")
        return cls(quant=quant, lora=_from_dict(LoraArgs, blocks.get("lora"), "lora"),
                   distill=_from_dict(DistillArgs, blocks.get("distill"), "distill"),
                   ptq=_from_dict(PtqArgs, blocks.get("ptq"), "ptq"), data=data,
                   selfgen=_from_dict(SelfGenArgs, blocks.get("selfgen"), "selfgen"),
                   eval=_from_dict(EvalArgs, blocks.get("eval"), "eval"),
                   export=_from_dict(ExportArgs, blocks.get("export"), "export"), train=train, **top)

    def loader_defaults(self, n_train: int, world_size: int = 1, n_eval: int = 0) -> dict:
        """TrainingArguments defaults that depend on the data: ``dataloader_drop_last=True`` unless the
        recipe sets it or the training set is smaller than one batch on every rank. A short last batch
        is a new input shape, and under ``torch_compile`` a new shape means a recompile with dynamic
        shapes: on an H200 that stalled the SmolLM2 W3 QAT run for ~5 minutes at its first epoch
        boundary (recipes/README.md, fifth run). The flag applies to the eval loader too, so the eval
        batch (unless the recipe sets it) becomes the largest size <= 8 dividing the held-out
        sequences of a rank: no held-out sequence is dropped."""
        if "dataloader_drop_last" in self.train:
            return {}
        ws = max(1, world_size)
        bs = int(self.train.get("per_device_train_batch_size", 8))
        if n_train < bs * ws:
            return {}
        out = {"dataloader_drop_last": True}
        per_rank = n_eval // ws
        if per_rank and "per_device_eval_batch_size" not in self.train:
            out["per_device_eval_batch_size"] = max(d for d in range(1, min(8, per_rank) + 1) if per_rank % d == 0)
        return out

    def training_arguments(self, **extra):
        """transformers.TrainingArguments from the flat keys (bad values named by TrainingArguments)."""
        from transformers import TrainingArguments
        kw = dict(output_dir=str(Path(self.output_dir) / "trainer"), seed=self.seed, report_to=_default_report_to(),
                  save_strategy="no", logging_steps=5, remove_unused_columns=False, use_cpu=None)
        kw.pop("use_cpu")
        kw.update(self.train)
        kw.update(extra)
        try:
            return TrainingArguments(**kw)
        except (ValueError, TypeError) as e:
            raise RecipeError(f"training arguments: {e}") from None


def _default_report_to() -> str:
    """Loss curves to tensorboard when it is installed (``<output_dir>/tb``), nowhere otherwise."""
    import importlib.util
    return "tensorboard" if importlib.util.find_spec("tensorboard") is not None else "none"


_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` (dotted for blocks) overrides to a recipe dict; values parsed as YAML."""
    d = dict(d)
    for ov in overrides or []:
        if "=" not in ov:
            raise RecipeError(f"override {ov!r} is not valid; allowed: key=value (e.g. lora.r=8)")
        key, val = ov.split("=", 1)
        val = yaml.safe_load(val)
        if isinstance(val, str) and _EXP_FLOAT.fullmatch(val.strip()):  # YAML 1.1 reads 2e-5 (no dot) as a string
            val = float(val)
        parts = key.strip().split(".")
        node = d
        for p in parts[:-1]:
            if p == "quant" and isinstance(node.get(p), str):
                node[p] = resolve_spec(node[p]).to_dict()
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = val
    return d


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file {str(p)!r} does not exist")
    d = yaml.safe_load(p.read_text()) or {}
    return Recipe.from_dict(apply_overrides(d, overrides or []))
