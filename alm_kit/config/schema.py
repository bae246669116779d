"""The recipe schema. Every key a recipe may contain is a field here (docs/recipes.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from alm_kit.text.mcq import McqTemplate, check_template

TrainMode = Literal["frozen", "full", "lora"]


def _positive(name: str, value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class ComponentConfig:
    """One component: a registered ``name``, its ``params`` and how it is trained."""

    name: str
    #: validated into the component's Config; null: none (resets a parent recipe's params, docs/recipes.md)
    params: dict[str, Any] | None = field(default_factory=dict)
    #: frozen: no gradients; full: every weight trains; lora: peft adapters only
    train: TrainMode = "full"
    #: learning rate for this component (default: training.lr)
    lr: float | None = None
    lora: LoraConfig | None = None
    #: encoders only: the stream's id (default: the name); must be unique
    id: str | None = None
    #: parameter names (glob patterns, relative to the component) that train whatever ``train`` says,
    #: e.g. a frozen Whisper's ``layer_weights`` (ALARM's learned layer mix)
    trainable: list[str] | None = None

    def __post_init__(self) -> None:
        if self.params is None:
            self.params = {}


@dataclass
class ModelConfig:
    encoders: list[ComponentConfig]
    projector: ComponentConfig
    decoder: ComponentConfig
    layout: ComponentConfig = field(default_factory=lambda: ComponentConfig(name="prefix"))
    #: how several encoder streams become one; may be omitted with a single encoder
    fusion: ComponentConfig | None = None

    def __post_init__(self) -> None:
        if not self.encoders:
            raise ValueError("model.encoders must list at least one encoder")
        ids = [e.id or e.name for e in self.encoders]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"encoder ids must be unique, repeated: {', '.join(dupes)} (set 'id:' to tell them apart)")


@dataclass
class SynthDataConfig:
    """Make the synthetic data set (alm-kit data synth) when the train manifest is missing."""

    out_dir: str
    n_train: int = 2000
    n_test: int = 400
    seed: int = 0
    #: the spoken_word task (needs espeak-ng): true, false, or null = iff espeak-ng is installed, so
    #: that the same recipe makes 7 tasks on one machine and 8 on another; shipped recipes pin it
    speech: bool | None = None
    #: a subset of the task names (docs/synth.md); null: every sound task
    tasks: list[str] | None = None


@dataclass
class DataConfig:
    #: training manifest (JSON Lines, docs/data.md) or Mellow ReasonAQA file; or WebDataset tar shards:
    #: a list of .tar paths and/or brace patterns ("shards/train-{000000..000009}.tar"), streamed
    train: str | list[str] | None = None
    #: multiple-choice test file (MMAU format) scored after training
    eval: str | None = None
    format: Literal["auto", "jsonl", "reasonaqa"] = "auto"
    #: skip examples whose audio is missing/unreadable/empty (and report how many) instead of failing
    skip_bad_audio: bool = False
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    synth: SynthDataConfig | None = None
    #: a held-out manifest (same format as train): its loss is logged every training.eval_every steps
    valid: str | None = None
    #: responses longer than training.max_response_tokens: truncate them (counted in the log) or
    #: reject the example (dropped before training, counted and named in the log)
    too_long: Literal["truncate", "reject"] = "truncate"
    #: build each training response from fields of its record: cota, thinking, or a format string
    #: such as "Answer: {answer}" (docs/decoders.md); null: the record's `response`
    response_template: str | None = None
    #: shards only: samples held by the streaming shuffle buffer (their encoded bytes stay in memory)
    shuffle_buffer: int = 1000

    def __post_init__(self) -> None:
        _positive("shuffle_buffer", self.shuffle_buffer)
        if self.response_template is not None:
            from alm_kit.text.templates import template_fields

            template_fields(self.response_template)


@dataclass
class AlignConfig:
    """The alignment stage (``training.objective: align``, docs/training.md)."""

    #: which text of each example the audio is aligned with (the caption is usually the response)
    text: Literal["response", "prompt"] = "response"
    #: initial softmax temperature of the contrastive logits (CLIP: 0.07); learned
    init_temperature: float = 0.07
    #: the learned logit scale is clamped to at most this (CLIP: 100)
    max_logit_scale: float = 100.0
    #: learning rate of the text head and the logit scale; null: training.lr
    lr: float | None = None

    def __post_init__(self) -> None:
        for name in ("init_temperature", "max_logit_scale", "lr"):
            _positive(name, getattr(self, name))


@dataclass
class TrainingConfig:
    output_dir: str = "runs/{name}"
    epochs: float = 1.0
    #: stop after this many optimizer steps (overrides epochs)
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = 1.0
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: frozen encoders: compute features once per clip and reuse them (docs/feature-cache.md); encoders
    #: that train (or have trainable parameters) run at every step beside the cache. auto: on disk when an
    #: encoder is frozen (off when one left to run crops at random); memory/disk insist (need a frozen one)
    cache_features: Literal["auto", "off", "memory", "disk"] = "auto"
    #: where the disk cache lives; null: $ALM_KIT_CACHE/features or ~/.cache/alm-kit/features (shared by recipes)
    cache_dir: str | None = None
    #: storage precision of cached features (float16 halves the size; a different cache key)
    cache_dtype: Literal["float32", "float16"] = "float32"
    #: longest response in tokens; longer ones are truncated (and counted)
    max_response_tokens: int = 256
    log_every: int = 10
    num_threads: int | None = None
    #: steps between checkpoints in <output_dir>/checkpoints/step-N (null: only at the end)
    save_every: int | None = None
    #: how many step-N checkpoints to keep, newest first (null: all)
    keep_checkpoints: int | None = 3
    #: steps between evaluations: held-out loss on data.valid, accuracy on data.eval (null: none)
    eval_every: int | None = None
    #: examples / test items per periodic evaluation (null: all)
    eval_max_items: int | None = 100
    #: batch examples of similar length together (less padding); deterministic given the seed
    bucket_by_length: bool = False
    #: torch.compile the decoder
    compile: bool = False
    #: the accelerator's peak TFLOP/s for the MFU in the progress bar and metrics.jsonl (default: known
    #: GPUs' dense bf16 peak by name; none on the CPU)
    peak_tflops: float | None = None
    #: under torchrun: ddp (replicate the model) or fsdp (shard it with fully_shard)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    #: write TensorBoard logs to <output_dir>/tensorboard when the tensorboard package is installed
    tensorboard: bool = True
    #: DataLoader worker processes that read and prepare audio; auto: 4 on CUDA when audio is decoded
    #: (none when features come from a cache in memory), 0 on the CPU (workers would take its cores)
    num_workers: int | Literal["auto"] = "auto"
    #: the in-memory feature cache on the GPU: auto = when it takes under a fifth of the free GPU memory
    cache_on_device: bool | Literal["auto"] = "auto"
    #: lm: next-token loss on the response; align: contrastive audio-text alignment (BLIP-2 stage 1)
    objective: Literal["lm", "align"] = "lm"
    align: AlignConfig = field(default_factory=AlignConfig)
    #: start from the weights of this checkpoint directory (e.g. an alignment stage's), then train
    init_from: str | None = None
    #: components to take from init_from (projector, fusion, encoders.<id>, decoder, layout); null: all it has
    init_components: list[str] | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum_steps", "lr", "max_steps", "log_every", "save_every",
                     "keep_checkpoints", "eval_every", "eval_max_items"):
            _positive(name, getattr(self, name))
        if self.num_workers != "auto" and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 or auto, got {self.num_workers}")


@dataclass
class GenerationConfig:
    """Decoding settings (docs/inference.md); every one can be overridden per call."""

    max_new_tokens: int = 64
    #: end tokens are not allowed before this many new tokens
    min_new_tokens: int = 0
    #: reuse keys/values of earlier positions (false: re-run the whole sequence for every token, as the
    #: reference Mellow code does; same tokens, much slower)
    use_cache: bool = True
    #: greedy (false) or sampling with temperature / top_p / top_k (0: off)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    #: beam search when > 1 (greedy beams; stop strings are applied to the best beam's text)
    num_beams: int = 1
    #: beam scores are divided by length ** length_penalty
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    #: the answer ends before the first of these strings
    stop: list[str] = field(default_factory=list)
    batch_size: int = 8
    #: clips per encoder pass: all (every distinct clip of a batch in one pass), a number, or auto
    #: (all on CUDA; 4 on CPU, where large passes run slower and hold more activation memory)
    encoder_batch: int | Literal["auto", "all"] = "auto"
    seed: int = 0
    #: fixed-shape decode steps replayed as CUDA graphs (docs/inference.md): auto = on CUDA when the decoder
    #: allows it; true = always (on the CPU the same steps run eagerly); false = the eager, row-dropping path
    cuda_graphs: bool | Literal["auto"] = "auto"
    #: weights when a model is loaded for inference: auto = bf16 on CUDA, fp32 elsewhere; fp32 keeps
    #: bf16 autocast on CUDA (encoder front ends such as mel filterbanks stay fp32 either way)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: thinking decoders (Qwen3): on / off (passed to the chat template); null: the template's default
    thinking: bool | None = None
    #: most tokens inside <think> ... </think>; then ``thinking_close`` is forced and the answer follows
    thinking_budget: int | None = None
    thinking_close: str = "\n\nConsidering the limited time, I have to give the answer now.\n</think>\n\n"
    #: how multiple-choice items are asked (alm-kit eval): auto | mellow | chat | a template with
    #: {question} and {choices} | {prompt, choice, labels, separator} to set how options are written
    #: (docs/evaluation.md)
    mcq_template: str | McqTemplate = "auto"

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "temperature", "num_beams", "batch_size", "repetition_penalty",
                     "thinking_budget"):
            _positive(name, getattr(self, name))
        if self.encoder_batch not in ("auto", "all"):
            _positive("encoder_batch", self.encoder_batch)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.num_beams > 1 and not self.use_cache:
            raise ValueError("num_beams > 1 (beam search) needs use_cache: true")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("num_beams > 1 is beam search; it cannot be combined with do_sample")
        if self.num_beams > 1 and self.thinking_budget is not None:
            raise ValueError("thinking_budget works with greedy decoding or sampling, not with beam search")
        check_template(self.mcq_template)


@dataclass
class RephraseConfig:
    """ALARM's self-rephrasing (``alm-kit rephrase``, docs/alarm.md). The three files are relative to
    the recipe file that names them (to the current directory when set on the command line or read
    from a checkpoint)."""

    #: step 1, the decoder answers from the text description: a template with {description} and {prompt}
    answer_prompt: str
    #: step 2, the answer rewritten as if heard: a template with {response} (reasoning + answer) or
    #: {answer}; {thought}, {prompt} and {description} may be used too
    rewrite_prompt: str
    #: regular expressions, one per line (# comments): a rewrite that matches one is dropped
    filter: str | None = None
    #: most new tokens of each step, the thought included
    answer_max_new_tokens: int = 2048
    rewrite_max_new_tokens: int = 4096
    #: thinking in the rewrite step; null: as in the answer step (generation.thinking)
    rewrite_thinking: bool | None = None

    def __post_init__(self) -> None:
        _positive("answer_max_new_tokens", self.answer_max_new_tokens)
        _positive("rewrite_max_new_tokens", self.rewrite_max_new_tokens)


@dataclass
class Recipe:
    name: str
    model: ModelConfig
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    #: ALARM-style self-rephrasing of a described data set (alm-kit rephrase)
    rephrase: RephraseConfig | None = None

    @property
    def output_dir(self) -> str:
        return self.training.output_dir.replace("{name}", self.name)
