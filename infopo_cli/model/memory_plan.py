"""The peak GPU memory of a training run, predicted from the model's config alone: no GPU, no weights.

Pure arithmetic over what one LoRA step on a frozen 4-bit base holds as infopo runs it (model/stack.py,
train/logps.py, data/batching.py) with transformers 5, peft and bitsandbytes:

- **weights**: every decoder linear layer in NF4 with double quantisation (bitsandbytes: 4-bit codes, an
  8-bit absmax per 64-weight block, a float32 absmax per 256 blocks); embeddings, output layer, norms and
  biases stay 16-bit (transformers never quantises the output layer; an embedding is not a linear layer).
- **LoRA**: weights and their gradients in float32 (peft up-casts adapters, `autocast_adapter_dtype`); the
  optimizer: bitsandbytes' paged 8-bit AdamW keeps two uint8 states and a float32 absmax per 256 values
  (2.03 bytes/weight; tensors under 4096 values keep float32 states), no float32 master copy (the LoRA
  weights are float32 already); torch's AdamW two float32 states.
- **activations**, per decoder layer and token, as autograd saves them (read off the saved tensors in
  tests/model/test_memory_plan.py): each RMSNorm its float32 input; the LoRA layers their 16-bit input, once per group of
  layers reading it (with dropout: each its dropped copy and the mask), their rank-r middle and the 16-bit copies
  of their weights (model/lora_layers.py); attention its query,
  keys and values (repeated to every head: infopo's batches carry a mask, and with one transformers repeats
  them), output and log-sum-exp (eager attention: the float32 probabilities and their 16-bit copy, T per
  token); the gated MLP its gate, activation and up outputs. The frozen 4-bit matmuls save no input.
- **checkpointing**: a recomputed layer keeps only its 16-bit input; the backward recomputes one layer at a
  time. The layers that are not recomputed are the last ones, whose activations the backward frees first.
- **the output layer** runs in 1024-token chunks, fused with the log-softmax and recomputed in the backward
  (train/output_layer.py): a chunk's logits in the compute dtype, their float32 copy and their gradient are
  the largest transient of a step on a 128k vocabulary.
- **the sequence layout**: `batch_size` pairs are 2 rows of prompt + response each, or with prompt sharing
  one row of prompt + chosen + rejected (and a (T x T) mask per row), each row padded to a multiple of 16
  positions as data/batching.py pads them.
- **sharded (`--fsdp` over N processes, model/sharding.py)**: FSDP2 splits each decoder layer's and the decoder's
  own parameters along dim 0, every rank holding ceil(rows / N) of each tensor (it pads the last shards): the 4-bit
  codes (stored in the compute dtype, bitsandbytes' `quant_storage`, as a (numel / 2 bytes, 1) tensor), norms,
  biases, an untied input embedding. Whole on every rank: the NF4 statistics (not parameters), the output layer
  (with a tied embedding), the adapter, its gradients and optimizer states. Gathered on top: the layer that runs
  and the one prefetched, and the final norm for the whole pass (an untied embedding is its own unit, gathered
  only for its lookup at the start of a pass, when no layer is).
- **what a CUDA process holds besides**: cuBLAS and cuBLASLt workspaces (in torch's allocator), the allocator's
  rounding and fragmentation, the CUDA context (outside it).

The peak is the largest of a few moments of the step (the output layer's backward, the backward of the last
layer kept whole, the recompute and backward of a checkpointed layer, a no-grad held-out/reference pass).
CUDA context and allocator slack are estimates; `torch.cuda.max_memory_allocated` (infopo's "peak memory")
is the allocated part, without them. `auto` keeps a margin free on top (`margin`): for what the plan does not
see, other processes on the card included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from infopo_cli.data.widths import PAD_MULTIPLE, padded_width  # collated widths: sdpa then copies no mask

GIB = 2**30
# bitsandbytes NF4, blocksize 64, compress_statistics (double quantisation): bytes per weight
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
LORA_BYTES = 4             # peft keeps the adapter in float32 whatever the compute dtype
CUDA_CONTEXT = GIB // 2    # the driver's and torch's own, outside the allocator (~0.5 GiB on recent cards)
# cuBLAS workspaces come from torch's caching allocator, one per (handle, stream), and a step uses two handles:
# the forward's thread and autograd's device thread. torch 2.x (aten/src/ATen/cuda/CublasHandlePool.cpp):
# CUBLAS_WORKSPACE_CONFIG defaults to ":4096:2:16:8" (8 MiB + 128 KiB), ":4096:8" (32 MiB) on Hopper (sm_90);
# cuBLASLt has its own, CUBLASLT_WORKSPACE_SIZE, default 1024 KiB. The plan does not know the card: Hopper's.
CUBLAS_WORKSPACE = 32 * 2**20
CUBLASLT_WORKSPACE = 2**20
BLAS_HANDLES = 2
# The caching allocator rounds each block up to 512 B and carves blocks from segments rounded up to 2 MiB;
# expandable segments (infopo's default, cli.py) grow one mapping instead of leaving freed segments of the wrong
# size, which is most of the fragmentation of steps of varying lengths. Stated, not measured: 10% of what a
# step allocates and frees.
SLACK = 0.10
MARGIN_SHARE = 0.10        # `auto` keeps max(10% of the card, 1.5 GiB) free unless told (--gpu-mem-margin)
MARGIN_MIN = 3 * GIB // 2
MIN_8BIT = 4096            # bitsandbytes' min_8bit_size: smaller tensors keep float32 optimizer states
PAGED_MIN = 100_000        # bitsandbytes pages (cudaMallocManaged) states of tensors this large, outside torch's allocator
MODES = ("auto", "on", "off", "offload")
MOST_CARDS = 16            # the most processes `fewest_cards` tries
GATHERED_LAYERS = 2        # FSDP2 gathers the layer that runs and prefetches the next
MASKLESS = ("flash_attention_2", "flash_attention_3")  # kernels that take no 4-D mask (so no shared prompt either)
LM_CHUNK = 1024             # tokens per output-layer chunk: train/logps.py CHUNK_TOKENS (a test checks they agree)
LM_CHUNK_CPU = 256          # on a CPU: train/logps.py CPU_CHUNK_TOKENS
NO_GRAD_CPU_TOKENS = 4096   # positions per decoder pass without gradients on a CPU (train/logps.py reads it here)


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder layer. `reads` names its input; linears reading the same one share it."""

    name: str
    fan_in: int
    fan_out: int
    reads: str  # attn_in (q/k/v), attn_out (o), mlp_in (gate/up), mlp_out (down)


@dataclass(frozen=True)
class Architecture:
    """What the plan needs of a decoder-only transformer's config.json."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    linears: tuple[Linear, ...]   # one decoder layer's
    norms_per_layer: int = 2      # Gemma-2 has four
    bias_params: int = 0          # per layer (Qwen2's q/k/v biases)
    attn_softcap: bool = False    # Gemma-2's attention soft-capping (eager attention): one more (T x T) tensor
    logit_softcap: bool = False   # Gemma-2's final logit soft-capping: one more float32 tensor per output chunk
    max_positions: int | None = None

    @property
    def linear_params(self) -> int:
        return self.layers * sum(lin.fan_in * lin.fan_out for lin in self.linears)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        return (self.linear_params + self.embedding_params + self.layers * (self.bias_params + self.norms_per_layer
                * self.hidden) + self.hidden)


def architecture(config: dict) -> Architecture:
    """An `Architecture` from a transformers config.json (a multimodal model's `text_config`). Raises KeyError for a
    missing field and ValueError for a model it cannot plan."""
    c = config.get("text_config") or config
    if any(c.get(key) for key in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise ValueError("a mixture-of-experts model")
    kind = str(c.get("model_type", "llama"))
    h, i, heads = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    d = int(c.get("head_dim") or h // heads)
    q, k = heads * d, kv * d
    sizes = {"hidden_size": h, "intermediate_size": i, "num_attention_heads": heads, "num_key_value_heads": kv,
             "head_dim": d, "num_hidden_layers": int(c["num_hidden_layers"]), "vocab_size": int(c["vocab_size"])}
    if bad := next((key for key, value in sizes.items() if value <= 0), None):
        raise ValueError(f"{bad} {sizes[bad]} is not a size")
    if kind == "phi3":  # fused projections (Phi-3 / 3.5)
        linears = (Linear("qkv_proj", h, q + 2 * k, "attn_in"), Linear("o_proj", q, h, "attn_out"),
                   Linear("gate_up_proj", h, 2 * i, "mlp_in"), Linear("down_proj", i, h, "mlp_out"))
    else:
        linears = (Linear("q_proj", h, q, "attn_in"), Linear("k_proj", h, k, "attn_in"), Linear("v_proj", h, k, "attn_in"),
                   Linear("o_proj", q, h, "attn_out"), Linear("gate_proj", h, i, "mlp_in"),
                   Linear("up_proj", h, i, "mlp_in"), Linear("down_proj", i, h, "mlp_out"))
    biased = c.get("attention_bias", kind == "qwen2")  # Qwen2 has q/k/v biases without saying so
    return Architecture(kind, h, i, int(c["num_hidden_layers"]), heads, kv, d, int(c["vocab_size"]),
                        bool(c.get("tie_word_embeddings", False)), linears,
                        norms_per_layer=4 if kind == "gemma2" else 2, bias_params=(q + 2 * k) if biased else 0,
                        attn_softcap=bool(c.get("attn_logit_softcapping")), logit_softcap=bool(c.get("final_logit_softcapping")),
                        max_positions=c.get("max_position_embeddings"))


@dataclass(frozen=True)
class Training:
    """How the run trains: what decides the bytes of each part."""

    lora_r: int
    targets: frozenset[str] | None  # LoRA target module names; None: every linear layer of the decoder
    lora_dropout: float
    compute_bytes: int              # 2 (bf16, fp16) or 4 (fp32)
    quantized: bool                 # NF4 base (else 16-bit, or fp32 with fp32 compute)
    optimizer: str                  # paged_adamw_8bit or adamw
    device: str                     # cuda or cpu
    attention: str                  # sdpa, eager, matmul or flash_attention_2
    lm_chunk: int                   # output-layer chunk (train/logps.py CHUNK_TOKENS)
    fsdp: int = 1                   # processes the frozen base is sharded over (FSDP2); 1: whole on the one card
    dequantised: bool = False       # a CPU run's 4-bit base also held de-quantised, for speed (model/stack.py)

    def targeted(self, linear: Linear) -> bool:
        """Whether LoRA is attached to this linear layer."""
        return self.targets is None or linear.name in self.targets


@dataclass(frozen=True)
class Layout:
    """The rows one micro-batch feeds the model: `rows` x `width` positions, `scored` of them response tokens."""

    rows: int
    width: int
    scored: int
    shared: bool  # prompt + chosen + rejected in one row (a (T x T) mask per row)

    @property
    def tokens(self) -> int:
        return self.rows * self.width


@dataclass(frozen=True)
class Batch:
    """A micro-batch of `pairs` pairs at their longest: `prompt` tokens and responses up to `max_length` in all."""

    pairs: int
    max_length: int
    prompt: int
    shared: bool

    @property
    def prompt_tokens(self) -> int:
        return max(1, min(self.prompt, self.max_length - 1))

    def layout(self) -> Layout:
        """The rows, padded width and scored tokens of this batch in its layout (shared prompt or chosen/rejected rows).
        """
        response = self.max_length - self.prompt_tokens
        if self.shared:
            return Layout(self.pairs, padded_width(self.prompt_tokens + 2 * response), 2 * self.pairs * response, True)
        return Layout(2 * self.pairs, padded_width(self.max_length), 2 * self.pairs * response, False)


def worst_layout(pairs: Sequence[tuple[int, int, int]], batch_size: int, shared: bool) -> Layout:
    """The micro-batch of the `batch_size` longest (prompt, chosen, rejected) lengths: batches are grouped by
    length, so it is one a run meets."""
    width = (lambda p: p[0] + p[1] + p[2]) if shared else (lambda p: p[0] + max(p[1], p[2]))
    longest = sorted(pairs, key=width, reverse=True)[:batch_size]
    rows = len(longest) * (1 if shared else 2)
    return Layout(rows, padded_width(width(longest[0])), sum(p[1] + p[2] for p in longest), shared)


def margin(card: int, given_gib: float | None = None) -> int:
    """The bytes `auto` keeps free on a card of `card` bytes: `given_gib` (--gpu-mem-margin), else max(10% of the
    card, 1.5 GiB)."""
    return round(given_gib * GIB) if given_gib is not None else max(round(MARGIN_SHARE * card), MARGIN_MIN)


@dataclass(frozen=True)
class Part:
    """One line of the plan: what holds memory, how many bytes, and how that was counted."""

    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class Plan:
    """The parts held at the step's peak (`moment`), and what the card needs besides."""

    static: tuple[Part, ...]       # weights, LoRA, gradients, optimizer: held all the time
    moment: str                    # when the peak happens
    dynamic: tuple[Part, ...]      # activations and transients held at that moment
    checkpointed: int              # layers recomputed in the backward
    layers: int
    offload: bool
    device: str
    moments: dict[str, int]        # every moment's allocated peak, for the curious
    host_bytes: int = 0            # offload: the saved layer inputs, in pinned CPU memory

    @property
    def allocated(self) -> int:
        """What `torch.cuda.max_memory_allocated` would show."""
        return sum(p.bytes for p in self.static + self.dynamic)

    @property
    def slack(self) -> int:
        return round(SLACK * sum(p.bytes for p in self.dynamic))

    @property
    def context(self) -> int:
        return CUDA_CONTEXT if self.device == "cuda" else 0

    @property
    def needed(self) -> int:
        """Allocated + slack: what must be free once the CUDA context exists (`torch.cuda.mem_get_info`)."""
        return self.allocated + self.slack

    @property
    def card(self) -> int:
        """What the whole card must have."""
        return self.needed + self.context


# --- the parts ---------------------------------------------------------------------------------------

def lora_tensors(arch: Architecture, run: Training) -> list[int]:
    """The sizes of the LoRA tensors (A and B of every targeted linear layer)."""
    return [n for lin in arch.linears if run.targeted(lin)
            for n in (run.lora_r * lin.fan_in, run.lora_r * lin.fan_out)] * arch.layers


def optimizer_bytes(sizes: Sequence[int], optimizer: str) -> tuple[int, int]:
    """(bytes in torch's allocator, bytes paged outside it) of the optimizer states of tensors of `sizes`."""
    if optimizer != "paged_adamw_8bit":
        return 8 * sum(sizes), 0  # exp_avg and exp_avg_sq in float32
    held = paged = 0
    for n in sizes:
        if n < MIN_8BIT:
            held += 8 * n
            continue
        absmax = 8 * math.ceil(n / 256)  # two float32 block maxima, never paged
        held += absmax
        if n >= PAGED_MIN:
            paged += 2 * n
        else:
            held += 2 * n
    return held, paged


def _bias_sizes(arch: Architecture) -> list[int]:
    """One decoder layer's bias tensors: the q/k/v projections' (Qwen2), else one of all `bias_params`."""
    if not arch.bias_params:
        return []
    qkv = [lin.fan_out for lin in arch.linears if lin.reads == "attn_in"]
    return qkv if sum(qkv) == arch.bias_params else [arch.bias_params]


def _layer_tensors(arch: Architecture, run: Training) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(linear weights, norms and biases) of one decoder layer as (rows, bytes per row): what FSDP2 splits along
    dim 0. The 4-bit codes are a ((numel + 1) // (2 * storage bytes), 1) tensor in the compute dtype (bitsandbytes'
    `quant_storage`); a 16-bit weight is (fan_out, fan_in)."""
    c = run.compute_bytes
    weights = [((lin.fan_in * lin.fan_out + 1) // (2 * c), c) if run.quantized else (lin.fan_out, lin.fan_in * c)
               for lin in arch.linears]
    return weights, [(n, c) for n in _bias_sizes(arch)] + [(arch.hidden, c)] * arch.norms_per_layer


def _decoder_tensors(arch: Architecture, run: Training) -> list[tuple[int, int]]:
    """The decoder's own sharded parameters as (rows, bytes per row): the final norm, and the input embedding unless
    it is the output layer's matrix too (that one stays whole)."""
    c = run.compute_bytes
    return [(arch.hidden, c)] + ([] if arch.tied_embeddings else [(arch.vocab, arch.hidden * c)])


def _shard(tensors: Sequence[tuple[int, int]], n: int) -> int:
    """Bytes one of `n` ranks holds of `tensors`: FSDP2 gives each ceil(rows / n) rows of each, padding the last."""
    return sum(-(-rows // n) * row for rows, row in tensors)


def fsdp_shard_bytes(arch: Architecture, run: Training, n: int) -> int:
    """Bytes one rank of `n` holds of the base's sharded parameters (FSDP2, model/sharding.py): every decoder layer's
    linear weights (4-bit codes), norms and biases, the final norm and an untied input embedding, each tensor padded
    to ceil(rows / n) rows. `n` = 1: those parameters whole."""
    weights, small = _layer_tensors(arch, run)
    return arch.layers * _shard(weights + small, n) + _shard(_decoder_tensors(arch, run), n)


def dequantised_bytes(arch: Architecture, run: Training) -> int:
    """What a CPU run's 4-bit base takes held de-quantised beside its NF4 weights: every linear weight in the
    compute dtype."""
    return arch.linear_params * run.compute_bytes


def _base_parts(arch: Architecture, run: Training) -> tuple[Part, ...]:
    """The frozen base on one card: quantised linear layers, embeddings and output layer, norms and biases."""
    c = run.compute_bytes
    base = (Part("base weights, 4-bit NF4", round(arch.linear_params * NF4_BYTES),
                 f"{arch.linear_params / 1e9:.2f}B weights x {NF4_BYTES:.3f} bytes (double quantisation)")
            if run.quantized else
            Part(f"base weights, {8 * c}-bit", arch.linear_params * c, f"{arch.linear_params / 1e9:.2f}B weights, unquantised"))
    if run.quantized and run.dequantised:
        base = (base, Part(f"base weights de-quantised, {8 * c}-bit", dequantised_bytes(arch, run),
                           "held for the run: no de-quantisation at each call (CPU)"))
    else:
        base = (base,)
    return (*base,
            Part("embeddings and output layer, 16-bit" if c == 2 else "embeddings and output layer",
                 arch.embedding_params * c, "tied: one matrix" if arch.tied_embeddings else "two vocab x hidden matrices"),
            Part("norms and biases", (arch.layers * (arch.norms_per_layer * arch.hidden + arch.bias_params) + arch.hidden) * c))


def _sharded_base_parts(arch: Architecture, run: Training) -> tuple[Part, ...]:
    """The frozen base on one of `run.fsdp` cards (FSDP2): the split parts, the whole ones, and what is gathered."""
    c, n = run.compute_bytes, run.fsdp
    bits = "16-bit" if c == 2 else f"{8 * c}-bit"
    split, whole = f"split {n} ways", "whole on every card"
    weights, small = _layer_tensors(arch, run)
    decoder = _decoder_tensors(arch, run)
    billions = f"{arch.linear_params / 1e9:.2f}B weights"
    gathered = min(GATHERED_LAYERS, arch.layers)
    parts = [Part("base weights, 4-bit codes", arch.layers * _shard(weights, n), f"{billions} x 0.5 bytes, {split}")
             if run.quantized else Part(f"base weights, {bits}", arch.layers * _shard(weights, n), f"{billions}, {split}")]
    if run.quantized:  # absmax per block and their own absmax: bitsandbytes' quant_state, no parameter FSDP sees
        parts.append(Part("base weights, NF4 statistics", round(arch.linear_params * (NF4_BYTES - 0.5)),
                          f"{NF4_BYTES - 0.5:.4f} bytes/weight (absmax), {whole}"))
    matrix = arch.vocab * arch.hidden * c
    if arch.tied_embeddings:
        parts.append(Part(f"embedding and output layer, {bits}", matrix, f"tied: one matrix, {whole}"))
    else:
        parts += [Part(f"input embedding, {bits}", _shard(decoder[1:], n), split),
                  Part(f"output layer, {bits}", matrix, whole)]
    parts += [Part("norms and biases", arch.layers * _shard(small, n) + _shard(decoder[:1], n), split),
              Part(f"gathered: {gathered} decoder layer{'s' if gathered > 1 else ''}",
                   gathered * n * _shard(weights + small, n), "the layer that runs and the next, prefetched, whole"),
              Part("gathered: the final norm", n * _shard(decoder[:1], n), "whole for the forward and the backward")]
    return tuple(parts)


def static_parts(arch: Architecture, run: Training) -> tuple[Part, ...]:
    """What a run holds for its whole length: base weights (`run.fsdp` > 1: one card's share and what it gathers),
    LoRA weights and gradients, optimizer states."""
    sizes = lora_tensors(arch, run)
    lora = sum(sizes)
    held, paged = optimizer_bytes(sizes, run.optimizer)
    optimizer = ("paged 8-bit AdamW" if run.optimizer == "paged_adamw_8bit" else "AdamW, float32 states")
    note = (f"2 bytes/weight + absmax; {paged / GIB:.2f} GiB of it paged (outside torch's allocator)"
            if run.optimizer == "paged_adamw_8bit" else "8 bytes/weight")
    whole = "whole on every card" if run.fsdp > 1 else ""  # the adapter is replicated, its gradients all-reduced

    def also(note: str) -> str:
        return f"{note}, {whole}" if whole else note

    workspaces = ((Part("cuBLAS and cuBLASLt workspaces", BLAS_HANDLES * (CUBLAS_WORKSPACE + CUBLASLT_WORKSPACE),
                        f"{BLAS_HANDLES} handles (forward, autograd) x ({CUBLAS_WORKSPACE >> 20} + "
                        f"{CUBLASLT_WORKSPACE >> 20} MiB), torch's defaults on Hopper"),)
                  if run.device == "cuda" else ())
    return (*(_sharded_base_parts(arch, run) if run.fsdp > 1 else _base_parts(arch, run)),
            Part("LoRA weights, float32", lora * LORA_BYTES, also(f"{lora / 1e6:.1f}M weights, r={run.lora_r}")),
            Part("LoRA gradients, float32", lora * LORA_BYTES, whole),
            Part(f"optimizer: {optimizer}", held + paged, also(note)), *workspaces)


def layer_saved_per_token(arch: Architecture, run: Training, layout: Layout) -> float:
    """Bytes autograd saves per token in one decoder layer that is not recomputed."""
    c, h, width = run.compute_bytes, arch.hidden, layout.width
    total = arch.norms_per_layer * (4 * h + 4)  # RMSNorm: the float32 input and 1/rms
    for group in dict.fromkeys(lin.reads for lin in arch.linears):
        targeted = [lin for lin in arch.linears if lin.reads == group and run.targeted(lin)]
        if not targeted:
            continue  # a frozen 4-bit (or 16-bit) matmul saves no input
        fan_in = targeted[0].fan_in
        # LoRA's down-projection saves its input as it comes, not a float32 copy (model/lora_layers.py)
        if run.lora_dropout > 0:  # each its own dropped copy, and the mask (bool on CUDA; CPU: the input's dtype)
            total += len(targeted) * fan_in * (c + (1 if run.device == "cuda" else c))
        elif not (group == "attn_out" and run.attention not in ("eager", "matmul")):  # the input, saved once for the group
            total += fan_in * c  # (attention's output is the very tensor sdpa saved)
        total += len(targeted) * run.lora_r * c  # lora_B's input (LoRA computes in the compute dtype)
    d, heads = arch.head_dim, arch.heads
    # transformers repeats keys and values to every head when it passes a mask (a shared prompt's always; padding
    # makes one in two-row batches: planned as if there); flash-attention takes them as they are
    kv = arch.kv_heads if run.attention in ("flash_attention_2", "matmul") else heads
    total += c * d * (heads + 2 * kv)  # query, keys, values
    if arch.model_type == "phi3" and kv == arch.kv_heads:  # unrepeated, v is a view that keeps the fused qkv output
        total += c * d * (heads + arch.kv_heads)
    if run.attention == "eager":  # the (T x T) scores per head: float32 softmax, its copy in the compute dtype
        total += heads * width * (4 + (c if c != 4 else 0) + (c if arch.attn_softcap else 0))  # (and tanh's, soft-capped)
    elif run.attention == "matmul":  # nothing more: the backward recomputes the scores (model/attention.py)
        pass
    else:
        total += c * d * heads + 4 * heads  # the output, the log-sum-exp
    total += 3 * c * arch.intermediate  # gate, activation, up
    return total


def layer_bytes(arch: Architecture, run: Training, layout: Layout) -> int:
    """One decoder layer kept whole: its saved activations, and the additive copy sdpa makes (and keeps for the
    backward) of a two-row batch's boolean mask."""
    mask_copy = run.compute_bytes * layout.rows * layout.width ** 2 if run.attention == "sdpa" and not layout.shared else 0
    # the 16-bit copies of the layer's LoRA weights its products saved (model/lora_layers.py)
    weight_copies = run.compute_bytes * sum(lora_tensors(arch, run)) // arch.layers if run.compute_bytes != LORA_BYTES else 0
    return round(layer_saved_per_token(arch, run, layout) * layout.tokens) + mask_copy + weight_copies


def _tail(arch: Architecture, run: Training, layout: Layout) -> int:
    """Held from the forward to the end of the backward outside the layers: the final norm's input, rotary cos/sin,
    the scored hidden states and their indices (the attention mask: `_mask`)."""
    c = run.compute_bytes
    per_token = 4 * arch.hidden + 4 + 2 * c * arch.head_dim
    return per_token * layout.tokens + (c * arch.hidden + 32) * layout.scored


def _additive_mask(run: Training, layout: Layout) -> bool:
    """Whether the (rows, 1, T, T) mask is additive, in the compute dtype (a shared prompt's, train/logps.py; eager and
    matmul attention's), or boolean (what transformers builds for sdpa from a two-row batch's padding)."""
    return layout.shared or run.attention in ("eager", "matmul")


def _mask(run: Training, layout: Layout) -> int:
    """The (rows, 1, T, T) attention mask, held from the forward to the end of the backward. Its width is a multiple
    of 16 (data/widths.py `padded_width`), so sdpa's memory-efficient kernel reads it as it is: no copy per layer.
    Flex-attention reads a block mask instead (a few indices per 128 x 128 block), flash-attention only the (rows, T)
    padding: nothing of the kind."""
    if run.attention == "flex_attention" or run.attention in MASKLESS:
        return 0
    return (run.compute_bytes if _additive_mask(run, layout) else 1) * layout.rows * layout.width ** 2


def _mask_part(run: Training, layout: Layout) -> Part:
    if run.attention == "flex_attention":
        note = "a block mask: a few indices per block of positions, no (T x T) mask"
    elif run.attention in MASKLESS:
        note = "none: flash-attention reads each row's padding from the (rows, T) mask"
    else:
        kind = f"additive, {8 * run.compute_bytes}-bit" if _additive_mask(run, layout) else "boolean"
        note = f"({layout.rows}, 1, {layout.width}, {layout.width}) {kind}; width padded to a multiple of {PAD_MULTIPLE}"
    return Part("attention mask", _mask(run, layout), note)


def _output_chunk(arch: Architecture, run: Training, layout: Layout, backward: bool) -> int:
    """The fused output layer on one chunk (train/output_layer.py) beyond `_output_buffers`: on a GPU the logits in
    the compute dtype and their float32 copy, normalised in place, and in the backward also the gradient of the
    logits in the compute dtype; on a CPU, where those buffers are kept (and the gradient reuses the product's), none;
    soft-capped, in the backward two float32 temporaries for the cap's slope."""
    n = min(run.lm_chunk, max(1, layout.scored))
    buffers = 0 if run.device == "cpu" else 4 + run.compute_bytes * (2 if backward else 1)
    return (buffers + (8 if backward and arch.logit_softcap else 0)) * arch.vocab * n


def _output_buffers(arch: Architecture, run: Training, scored: int) -> int:
    """On a CPU the output layer's two buffers (a chunk's logits in the compute dtype, their float32 copy) stay
    allocated from the first call on, whatever the step is doing; a chunk is at most `scored` positions (the most
    any of the run's batches scores)."""
    return (4 + run.compute_bytes) * arch.vocab * min(run.lm_chunk, max(1, scored)) if run.device == "cpu" else 0


def _scores(arch: Architecture, run: Training, layout: Layout, tensors: int) -> int:
    """`matmul` attention's transient (T x T) score tensors per head, for as many rows as it takes at once."""
    if run.attention != "matmul":
        return 0
    from infopo_cli.model.attention import SCORES_PER_CALL

    per_row = arch.heads * layout.width ** 2
    return tensors * run.compute_bytes * per_row * min(layout.rows, max(1, SCORES_PER_CALL // per_row))


def _layer_backward(arch: Architecture, run: Training, layout: Layout) -> int:
    """The gradients a layer's backward makes beyond what it frees (at its largest, the down projection's: a float32
    LoRA gradient and one in the compute dtype; the residual stream's in and out), and the weight bitsandbytes
    dequantises for it unless the base is held de-quantised (measured on CPU, tests/model/test_memory_plan.py)."""
    c = run.compute_bytes
    dequantised = c * max(lin.fan_in * lin.fan_out for lin in arch.linears) if run.quantized and not run.dequantised else 0
    mlp = ((LORA_BYTES + c) * arch.intermediate + 2 * c * arch.hidden) * layout.tokens + dequantised
    # matmul attention's backward, later: probabilities, their gradient, the scores', and q, k, v's; by then the
    # MLP's saved gate, activation and up outputs are freed
    attention = _scores(arch, run, layout, 3) + c * (
        arch.head_dim * (arch.heads + 2 * arch.kv_heads) - 3 * arch.intermediate) * layout.tokens
    return max(mlp, attention if run.attention == "matmul" else 0)


def _no_grad_pass(arch: Architecture, run: Training, layout: Layout, buffers: int = 0) -> int:
    """A held-out or reference batch under no-grad: one layer's working set (the MLP's intermediates and the float32
    copy peft makes of the down projection's input, the residual stream) and an output chunk."""
    c = run.compute_bytes
    working = (3 * c + LORA_BYTES) * arch.intermediate + 3 * c * arch.hidden
    # on a CPU the decoder runs NO_GRAD_CPU_TOKENS positions at a time (train/logps.py)
    tokens = min(layout.tokens, max(layout.width, NO_GRAD_CPU_TOKENS)) if run.device == "cpu" else layout.tokens
    # the MLP's working set, or at another moment matmul attention's scores and probabilities
    return (max(round(working * tokens), _scores(arch, run, layout, 2)) + buffers
            + _output_chunk(arch, run, layout, backward=False) + _tail(arch, run, layout) + _mask(run, layout))


def plan(arch: Architecture, run: Training, layout: Layout, checkpointed: int, offload: bool = False,
         eval_layout: Layout | None = None) -> Plan:
    """The peak of one training step with the first `checkpointed` decoder layers recomputed (the others keep their
    activations); `offload`: the recomputed layers' inputs in pinned CPU memory (CUDA)."""
    checkpointed = max(0, min(arch.layers, checkpointed))
    kept = arch.layers - checkpointed
    static = static_parts(arch, run)
    inputs = run.compute_bytes * arch.hidden * layout.tokens * checkpointed
    on_gpu_inputs = 0 if offload else inputs
    whole, tail = layer_bytes(arch, run, layout), _tail(arch, run, layout)
    grad_hidden = run.compute_bytes * arch.hidden * layout.tokens
    held = ([Part(f"saved inputs of {checkpointed} recomputed layers", on_gpu_inputs, "16-bit hidden states")]
            if checkpointed and not offload else [])
    held += [Part(f"saved activations of {kept} layers kept whole", kept * whole,
                  f"{layer_saved_per_token(arch, run, layout) / 1024:.0f} KiB per token per layer")] if kept else []
    held += [Part("final norm, scored hidden states, positions", tail), _mask_part(run, layout)]
    no_grad = eval_layout or layout
    buffers = _output_buffers(arch, run, max(layout.scored, no_grad.scored))
    if buffers:
        held += [Part("output layer's buffers (kept on a CPU)", buffers,
                      f"{buffers // ((4 + run.compute_bytes) * arch.vocab)} tokens x {arch.vocab} vocabulary, in the "
                      "compute dtype and float32")]
    moments: dict[str, tuple[Part, ...]] = {
        "the output layer's backward": (*held, Part("output layer: a chunk of logits (float32 copy), their gradient",
                                                    _output_chunk(arch, run, layout, backward=True) + grad_hidden,
                                                    f"{min(run.lm_chunk, layout.scored)} tokens x {arch.vocab} vocabulary")),
    }
    if kept:
        moments["the backward of the last layer kept whole"] = (
            *held, Part("backward working set of a layer", _layer_backward(arch, run, layout)))
    if checkpointed:
        moments["the recompute and backward of a checkpointed layer"] = (
            *([Part(f"saved inputs of {checkpointed} recomputed layers", on_gpu_inputs, "16-bit hidden states")]
              if not offload else []),
            Part("final norm, scored hidden states, positions", tail), _mask_part(run, layout),
            *([Part("output layer's buffers (kept on a CPU)", buffers)] if buffers else []),
            Part("one recomputed layer", whole), Part("backward working set of a layer", _layer_backward(arch, run, layout)))
    moments["a held-out or reference pass (no grad)"] = (Part("no-grad working set", _no_grad_pass(arch, run, no_grad, buffers),
                                                              f"{no_grad.rows} rows x {no_grad.width} tokens"),)
    gradients = next(p.bytes for p in static if p.name.startswith("LoRA gradients"))
    peaks = {name: sum(p.bytes for p in static + parts) - (gradients if name.startswith("a held-out") else 0)
             for name, parts in moments.items()}
    moment = max(peaks, key=peaks.__getitem__)
    return Plan(static, moment, moments[moment], checkpointed, arch.layers, offload, run.device, peaks,
                host_bytes=inputs if offload else 0)


# --- choices and searches ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    """The checkpointing a budget picked, whether it fits, and the plan without recomputation to compare."""

    plan: Plan       # the checkpointing chosen
    fits: bool       # in the budget (True when the budget is unknown)
    without: Plan    # the same run with no recomputation, for the reason


def choose(arch: Architecture, run: Training, layout: Layout, mode: str, budget: int | None,
           eval_layout: Layout | None = None) -> Choice:
    """The checkpointing of `mode` for a run with `budget` bytes free (None: unknown). `auto` recomputes as few
    layers as fit: none when everything fits; every layer when even that does not fit (or the budget is unknown:
    none)."""
    def at(layers: int, offload: bool = False) -> Plan:
        return plan(arch, run, layout, layers, offload, eval_layout)

    def fits(p: Plan) -> bool:
        return budget is None or p.needed <= budget

    without = at(0)
    if mode != "auto":
        chosen = at(0 if mode == "off" else arch.layers, offload=mode == "offload" and run.device == "cuda")
    elif budget is None:
        chosen = without
    else:
        chosen = next((p for p in map(at, range(arch.layers + 1)) if fits(p)), None) or at(arch.layers)
    return Choice(chosen, fits(chosen), without)


def fewest_cards(arch: Architecture, run: Training, layout: Layout, mode: str, budget: int, eval_layout: Layout | None
                 = None, start: int = 2) -> int | None:
    """The fewest processes from `start` to MOST_CARDS, each with `budget` bytes free, over which the base sharded
    (`--fsdp`) fits with checkpointing `mode`; None: not even MOST_CARDS."""
    return next((n for n in range(max(2, start), MOST_CARDS + 1)
                 if choose(arch, replace(run, fsdp=n), layout, mode, budget, eval_layout).fits), None)


def largest_batch(arch: Architecture, run: Training, batch: Batch, checkpointed: bool, budget: int,
                  limit: int = 4096) -> int:
    """The most pairs per micro-batch that fit in `budget` (0: not even one)."""
    def fits(pairs: int) -> bool:
        b = replace(batch, pairs=pairs)
        return plan(arch, run, b.layout(), arch.layers if checkpointed else 0).needed <= budget
    return _last_true(fits, 1, limit)


def longest_length(arch: Architecture, run: Training, batch: Batch, checkpointed: bool, budget: int) -> int:
    """The longest `max_length` (a multiple of 64, the prompt keeping its share) that fits in `budget` (0: none)."""
    share = batch.prompt / batch.max_length
    top = arch.max_positions or 131072

    def fits(blocks: int) -> bool:
        length = 64 * blocks
        b = replace(batch, max_length=length, prompt=max(1, round(share * length)))
        return plan(arch, run, b.layout(), arch.layers if checkpointed else 0).needed <= budget
    return 64 * _last_true(fits, 1, max(1, top // 64))


def advice(arch: Architecture, run: Training, batch: Batch, grad_accum: int, budget: int, mode: str) -> list[str]:
    """What to change, most helpful first: ways to fit when the run does not, room to use when it does."""
    every = plan(arch, run, batch.layout(), arch.layers)
    tips = []
    if every.needed > budget:
        if run.device == "cuda" and plan(arch, run, batch.layout(), arch.layers, offload=True).needed <= budget:
            tips.append("--gradient-checkpointing offload (the recomputed layers' inputs in pinned CPU memory)")
        pairs = largest_batch(arch, run, batch, True, budget)
        if 0 < pairs < batch.pairs:
            tips.append(f"--batch-size {pairs} --grad-accum {math.ceil(batch.pairs * grad_accum / pairs)} (about the same "
                        "global batch)")
        length = longest_length(arch, run, batch, True, budget)
        if length >= 64:
            tips.append(f"--max-length {length} (the longest that fits at --batch-size {batch.pairs})")
        if not tips:
            tips.append(f"a GPU with more memory (the run needs {gib(every.card)} GiB)")
        return tips
    whole = plan(arch, run, batch.layout(), 0)
    if mode in ("on", "offload") and whole.needed <= budget:
        tips.append("--gradient-checkpointing auto or off: the run fits without recomputation (about a quarter less "
                    "work per step)")
    more, more_whole = largest_batch(arch, run, batch, True, budget), largest_batch(arch, run, batch, False, budget)
    if more > batch.pairs:
        tips.append(f"room for --batch-size {more} with checkpointing" + (f" ({more_whole} without)" if more_whole else "")
                    + " (fewer, larger micro-batches: lower --grad-accum to keep the global batch)")
    return tips


def _last_true(fits, low: int, high: int) -> int:
    """The largest n in [low, high] with fits(n), for a `fits` true up to some n and false after (low - 1: none)."""
    if not fits(low):
        return low - 1
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def gib(n: float) -> str:
    """Bytes as GiB for tables: one decimal from 10 GiB up, two below."""
    return f"{n / GIB:.1f}" if n >= 10 * GIB else f"{n / GIB:.2f}"
