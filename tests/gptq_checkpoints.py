"""Tiny GPTQ and FP8 checkpoints for tests, without any download.

From a tiny random transformers checkpoint, `write_gptq` writes two directories:
- the GPTQ checkpoint in the layout AutoGPTQ / GPTQModel publish (TII's Falcon-H1 GPTQ releases):
  config.json with `quantization_config`, and per quantized projection `qweight` int32 [K / (32/bits), N]
  (values packed along the input dimension, lowest bits first), `qzeros` int32 [G, N / (32/bits)] (packed
  along the output dimension; format "gptq" stores zero - 1, "gptq_v2" the zero), `scales` fp16 [G, N],
  `g_idx` int32 [K] (act-order: channels quantized in a permuted order, groups following that order);
  every other tensor in fp16;
- the same model with every weight dequantized (W = scales * (q - zero)), as a plain checkpoint:
  transformers on it is the reference.
The packer here is written independently of engine/quantization so that one cannot hide the other's bug.

`write_fp8_reference` writes the plain checkpoint whose projections are the per-output-row float8_e4m3
round trip of the original, the reference for `--quantization fp8`; `write_fp8_checkpoint` an FP8
checkpoint as vLLM reads them (`quant_method: "fp8"`) or as llm-compressor writes them (compressed-tensors'
"float-quantized" format) with its dequantized reference; `write_compressed_tensors_int` llm-compressor's integer
checkpoints (the "pack-quantized" format); `write_awq` AutoAWQ's.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# The projections GPTQ quantizes in each architecture (tensor-name patterns of their weights).
QUANTIZED = re.compile(r"\.(self_attn\.(q|k|v|o)_proj|mamba\.(in|out)_proj|feed_forward\.(gate|up|down)_proj"
                       r"|mixer\.(in|out)_proj)\.weight$")
# Projections that read the same input share an act-order permutation, as real GPTQ runs give them
# (the permutation comes from that input's Hessian).
_SAME_INPUT = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
               "mamba.in_proj": "attn_in", "feed_forward.gate_proj": "mlp_in", "feed_forward.up_proj": "mlp_in"}


def _input_key(prefix: str) -> str:
    layer, _, module = prefix.partition(".layers.")[2].partition(".")
    return f"{layer}.{_SAME_INPUT.get(module, module)}"


def pack_along_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """q [K, N] unsigned values -> int32 [K / (32/bits), N]; value k of a word at bits (k % pack) * bits."""
    pack = 32 // bits
    out = np.zeros((q.shape[0] // pack, q.shape[1]), dtype=np.uint32)
    for i in range(pack):
        out |= q[i::pack].astype(np.uint32) << np.uint32(bits * i)
    return out.view(np.int32)


def pack_along_cols(q: np.ndarray, bits: int) -> np.ndarray:
    return np.ascontiguousarray(pack_along_rows(np.ascontiguousarray(q.T), bits).T)


def quantize(w: torch.Tensor, bits: int, group_size: int, g_idx: torch.Tensor, sym: bool, v1: bool):
    """Round-to-nearest per (group, output row). Returns (q [K, N], zeros [G, N], scales fp16 [G, N], W_deq [N, K])."""
    N, K = w.shape
    maxq = (1 << bits) - 1
    groups = int(g_idx.max()) + 1
    q = torch.zeros(K, N, dtype=torch.int64)
    zeros = torch.zeros(groups, N, dtype=torch.int64)
    scales = torch.zeros(groups, N, dtype=torch.float16)
    deq = torch.zeros(N, K)
    for g in range(groups):
        cols = (g_idx == g).nonzero().flatten()
        wg = w[:, cols].double()  # [N, group]
        if sym:
            scale = (2 * wg.abs().amax(dim=1) / maxq).clamp_min(1e-8)
            zero = torch.full((N,), (maxq + 1) // 2, dtype=torch.int64)
        else:
            lo, hi = wg.amin(dim=1).clamp(max=0), wg.amax(dim=1).clamp(min=0)
            scale = ((hi - lo) / maxq).clamp_min(1e-8)
            # v1 stores zero - 1, so a zero point of 0 cannot be written: GPTQ v1 writers never produce one here.
            zero = torch.round(-lo / scale).clamp(1 if v1 else 0, maxq).long()
        scale16 = scale.half()
        codes = torch.round(wg / scale16.double()[:, None]) + zero[:, None]
        codes = codes.clamp(0, maxq).long()
        q[cols] = codes.T
        zeros[g], scales[g] = zero, scale16
        deq[:, cols] = ((codes - zero[:, None]).double() * scale16.double()[:, None]).float()
    return q, zeros, scales, deq


def _g_idx(K: int, group_size: int, perm: torch.Tensor | None) -> torch.Tensor:
    gs = K if group_size == -1 else group_size
    order = torch.arange(K) if perm is None else perm
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[order] = (torch.arange(K) // gs).to(torch.int32)  # the i-th channel quantized is in group i // gs
    return g_idx


def write_gptq(source: Path, gptq_dir: Path, plain_dir: Path, *, bits: int, group_size: int, desc_act: bool,
               checkpoint_format: str = "gptq", sym: bool = True, shared_act_order: bool = True, seed: int = 0
               ) -> None:
    """source: a tiny fp32 checkpoint (tests/tiny_models.build_checkpoint). See the module docstring."""
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(str(Path(source) / "model.safetensors"))
    quantized, plain = {}, {}
    perms: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not QUANTIZED.search(name):
            quantized[name] = t.half()
            plain[name] = t.half().float()
            continue
        prefix = name[: -len(".weight")]
        N, K = t.shape
        perm = None
        if desc_act:
            key = _input_key(prefix) if shared_act_order else prefix
            perm = perms.setdefault(key, torch.randperm(K, generator=gen))
        g_idx = _g_idx(K, group_size, perm)
        q, zeros, scales, deq = quantize(t.float(), bits, group_size, g_idx, sym, checkpoint_format == "gptq")
        stored_zeros = (zeros - 1) & ((1 << bits) - 1) if checkpoint_format == "gptq" else zeros
        quantized[prefix + ".qweight"] = torch.from_numpy(pack_along_rows(q.numpy(), bits))
        quantized[prefix + ".qzeros"] = torch.from_numpy(pack_along_cols(stored_zeros.numpy(), bits))
        quantized[prefix + ".scales"] = scales
        quantized[prefix + ".g_idx"] = g_idx
        plain[name] = deq
    _write_pair(source, gptq_dir, quantized, plain_dir, plain, dict(
        quant_method="gptq", bits=bits, group_size=group_size, desc_act=desc_act, sym=sym,
        checkpoint_format=checkpoint_format, lm_head=False, pack_dtype="int32", damp_percent=0.01,
        true_sequential=True, static_groups=False, meta=dict(quantizer=["gptqmodel:2.2.0"])))


def _write_pair(source: Path, quant_dir: Path, quantized: dict, plain_dir: Path, plain: dict, quant_config: dict
                ) -> None:
    """The quantized checkpoint (config with quantization_config, fp16 dtype) and its plain reference,
    each with source's tokenizer files."""
    config = json.loads((Path(source) / "config.json").read_text())
    config["torch_dtype"] = "float16"
    for directory, weights, cfg in ((quant_dir, quantized, dict(config, quantization_config=quant_config)),
                                    (plain_dir, plain, config)):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(cfg))
        for f in Path(source).glob("tokenizer*"):
            shutil.copy(f, directory / f.name)


def _split_projections(source: Path) -> tuple[dict, dict, dict, list[str]]:
    """source's tensors: (the projections to quantize, the rest in fp16, the rest as the reference reads it,
    the modules an llm-compressor `ignore` list names: lm_head and the Linear layers left in 16 bits)."""
    projections, rest, plain, ignore = {}, {}, {}, ["lm_head"]
    for name, t in load_file(str(Path(source) / "model.safetensors")).items():
        if QUANTIZED.search(name):
            projections[name] = t
            continue
        rest[name], plain[name] = t.half(), t.half().float()
        if name.endswith("_proj.weight"):  # FalconMamba's x_proj, dt_proj
            ignore.append(name[: -len(".weight")])
    return projections, rest, plain, ignore


def write_compressed_tensors_int(source: Path, ct_dir: Path, plain_dir: Path, *, bits: int, group_size: int,
                                 sym: bool, actorder: bool, seed: int = 0) -> None:
    """An integer checkpoint as llm-compressor writes it (compressed-tensors' pack-quantized format, W4A16 /
    W8A16 with or without GPTQ): per projection `weight_packed` int32 [N, K / (32/bits)] (each row's codes, signed
    q + 2^(bits-1), packed along K lowest bits first), `weight_scale` fp16 [N, G], `weight_zero_point` int32
    [N / (32/bits), G] packed along N when asymmetric (none when symmetric: the zero is 2^(bits-1)),
    `weight_shape` [N, K], `weight_g_idx` [K] with act-order; group_size -1: strategy "channel". plain_dir: the
    dequantized reference."""
    gen = torch.Generator().manual_seed(seed)
    projections, quantized, plain, ignore = _split_projections(source)
    perms = {}
    for name, t in projections.items():
        prefix = name[: -len(".weight")]
        N, K = t.shape
        perm = perms.setdefault(_input_key(prefix), torch.randperm(K, generator=gen)) if actorder else None
        g_idx = _g_idx(K, group_size, perm)
        codes, zeros, scales, deq = quantize(t.float(), bits, group_size, g_idx, sym, v1=False)  # [K, N], [G, N]
        quantized[prefix + ".weight_packed"] = torch.from_numpy(pack_along_cols(codes.T.numpy(), bits))
        quantized[prefix + ".weight_scale"] = scales.T.contiguous()
        quantized[prefix + ".weight_shape"] = torch.tensor([N, K])
        if not sym:
            quantized[prefix + ".weight_zero_point"] = torch.from_numpy(pack_along_rows(zeros.T.numpy(), bits))
        if actorder:
            quantized[prefix + ".weight_g_idx"] = g_idx
        plain[name] = deq
    weights = dict(num_bits=bits, type="int", symmetric=sym, strategy="channel" if group_size == -1 else "group",
                   group_size=None if group_size == -1 else group_size, dynamic=False,
                   actorder="group" if actorder else None, observer="minmax", block_structure=None)
    group = dict(targets=["Linear"], weights=weights, input_activations=None, output_activations=None,
                 format="pack-quantized")
    _write_pair(source, ct_dir, quantized, plain_dir, plain, dict(
        quant_method="compressed-tensors", format="pack-quantized", quantization_status="compressed",
        config_groups={"group_0": group}, ignore=ignore, kv_cache_scheme=None, global_compression_ratio=None))


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's GEMM packing: word slot i holds column 8 c + AWQ_ORDER[i]


def pack_awq_cols(q: np.ndarray) -> np.ndarray:
    """q [R, C] 4-bit unsigned values -> int32 [R, C / 8], each word's 8 columns in AWQ_ORDER."""
    out = np.zeros((q.shape[0], q.shape[1] // 8), dtype=np.uint32)
    for slot, column in enumerate(AWQ_ORDER):
        out |= q[:, column::8].astype(np.uint32) << np.uint32(4 * slot)
    return out.view(np.int32)


def write_awq(source: Path, awq_dir: Path, plain_dir: Path, *, group_size: int) -> None:
    """A 4-bit checkpoint as AutoAWQ writes it (version "gemm"): per projection `qweight` int32 [K, N / 8] and
    `qzeros` int32 [G, N / 8] packed along N in AWQ_ORDER, `scales` fp16 [G, N]; asymmetric (zero_point true).
    plain_dir: the dequantized reference."""
    projections, quantized, plain, ignore = _split_projections(source)
    for name, t in projections.items():
        prefix = name[: -len(".weight")]
        g_idx = _g_idx(t.shape[1], group_size, None)
        codes, zeros, scales, deq = quantize(t.float(), 4, group_size, g_idx, sym=False, v1=False)  # [K, N], [G, N]
        quantized[prefix + ".qweight"] = torch.from_numpy(pack_awq_cols(codes.numpy()))
        quantized[prefix + ".qzeros"] = torch.from_numpy(pack_awq_cols(zeros.numpy()))
        quantized[prefix + ".scales"] = scales
        plain[name] = deq
    _write_pair(source, awq_dir, quantized, plain_dir, plain, dict(
        quant_method="awq", bits=4, group_size=group_size, zero_point=True, version="gemm",
        modules_to_not_convert=ignore[1:] or None))  # AutoAWQ never quantizes lm_head: it names the rest only


def write_fp8_reference(source: Path, plain_dir: Path) -> None:
    """source's projections replaced by their per-output-row float8_e4m3 round trip (scale = amax / 448)."""
    tensors = load_file(str(Path(source) / "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if QUANTIZED.search(name):
            scale = t.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 448.0
            t = (t.float() / scale).to(torch.float8_e4m3fn).float() * scale
        out[name] = t.contiguous()
    plain_dir = Path(plain_dir)
    plain_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(plain_dir / "model.safetensors"), metadata={"format": "pt"})
    for f in list(Path(source).glob("tokenizer*")) + [Path(source) / "config.json"]:
        shutil.copy(f, plain_dir / f.name)


def write_fp8_checkpoint(source: Path, fp8_dir: Path, plain_dir: Path, *, per_channel: bool, static: bool,
                         compressed_tensors: bool = False, weight_only: bool = False) -> None:
    """An FP8 checkpoint: per projection `weight` float8_e4m3fn and `weight_scale` per tensor or per output
    channel ([N, 1]), `input_scale` with static activations; the rest fp16. vLLM's `quant_method: "fp8"`: fp32
    scales, per tensor a scalar. compressed-tensors (llm-compressor's layout): fp16 scales, per tensor [1], one
    config group targeting Linear (weight_only: no input_activations), the 16-bit Linear modules listed in
    `ignore`. plain_dir: the same model with W = codes * weight_scale, the reference."""
    scale_dtype = torch.float16 if compressed_tensors else torch.float32
    projections, fp8, plain, ignore = _split_projections(source)
    for name, t in projections.items():
        prefix = name[: -len(".weight")]
        amax = t.abs().amax(dim=1, keepdim=True) if per_channel else t.abs().amax().reshape(
            [1] if compressed_tensors else [])
        scale = (amax / 448.0).to(scale_dtype)
        codes = (t / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
        fp8[name], fp8[prefix + ".weight_scale"] = codes, scale
        if static:
            fp8[prefix + ".input_scale"] = torch.tensor([0.05] if compressed_tensors else 0.05, dtype=scale_dtype)
        plain[name] = codes.float() * scale.float()
    if not compressed_tensors:
        config = dict(quant_method="fp8", activation_scheme="static" if static else "dynamic", ignored_layers=ignore)
    else:
        args = dict(num_bits=8, type="float", symmetric=True, group_size=None, block_structure=None, actorder=None)
        inputs = dict(args, strategy="tensor" if static else "token", dynamic=not static,
                      observer="static_minmax" if static else None)
        group = dict(targets=["Linear"], weights=dict(args, strategy="channel" if per_channel else "tensor",
                                                      dynamic=False, observer="minmax"),
                     input_activations=None if weight_only else inputs, output_activations=None,
                     format="float-quantized")
        config = dict(quant_method="compressed-tensors", format="float-quantized", quantization_status="compressed",
                      config_groups={"group_0": group}, ignore=ignore, kv_cache_scheme=None,
                      global_compression_ratio=None)
    _write_pair(source, fp8_dir, fp8, plain_dir, plain, config)
