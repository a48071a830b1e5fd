"""`starling-jax convert SOURCE OUTPUT`: a Hugging Face directory, a preset (random init) or a trained run's stage ->
a Hugging Face safetensors directory (the library side is io/hf.py load/save and stages/export.py). `--peft DIR`
merges a PEFT LoRA adapter directory (io/peft.py) into a Hugging Face directory source's weights. The output ends
with digests.json, the size and CRC-32 of every file written (starling_jax.digests), which hf.load checks before
reading the directory: a copy damaged later is an error naming the file, not a silent load."""

from __future__ import annotations

import os

import jax

from starling_jax import digests, models
from starling_jax.errors import InputError
from starling_jax.io import gguf, hf, peft
from starling_jax.stages import export


def add_convert_arguments(parser) -> None:
    parser.add_argument("source",
                        help="a local HF safetensors directory, a llama.cpp .gguf file (llama family), preset:NAME "
                             "(random init, e.g. preset:tiny), or a trained run: WORKDIR, WORKDIR/<stage> or its export "
                             "(written as a complete HF directory with tokenizer files, chat template and generation "
                             "config)")
    parser.add_argument("output", help="directory to write (config.json + safetensors)")
    parser.add_argument("--stage", default=None, help="WORKDIR source only: the stage (default: the last finished)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="parameter dtype to write (default: the source's; float32 for a preset)")
    parser.add_argument("--head", choices=("lm", "score"), default=None, help="preset only: output head")
    parser.add_argument("--seed", type=int, default=0, help="preset only: random-init seed")
    parser.add_argument("--max-shard-gb", type=float, default=hf.DEFAULT_MAX_SHARD_BYTES / 1e9,
                        help="split the safetensors into files of at most this many GB (default 5)")
    parser.add_argument("--adapters", action="store_true",
                        help="a run's LoRA stage only: write its adapters as a PEFT directory (adapter_config.json + "
                             "adapter_model.safetensors, for the base the stage started from) instead of the merged "
                             "model")
    parser.add_argument("--peft", default=None, metavar="ADAPTER_DIR",
                        help="HF directory source only: merge this PEFT LoRA adapter directory (adapter_config.json + "
                             "adapter_model.safetensors, made for that base) into the weights written")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty output directory, replacing its config.json and safetensors")


def check_output_dir(path: str, overwrite: bool) -> None:
    """Refuse to write into a non-empty directory (or over a file) unless `overwrite`; with `overwrite`, remove the
    model files a previous save left there (config.json, *.safetensors, the index, digests.json), so no stale shard
    survives."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{path}: exists and is not a directory; choose another output directory")
    if not os.path.isdir(path) or not os.listdir(path):
        return
    if not overwrite:
        raise InputError(f"{path}: output directory is not empty ({', '.join(sorted(os.listdir(path))[:5])}"
                         f"{' ...' if len(os.listdir(path)) > 5 else ''}); choose an empty or new directory, or pass "
                         f"--overwrite to replace the model files in it")
    for name in os.listdir(path):
        if name in ("config.json", hf.INDEX_FILE, digests.MANIFEST) or name.endswith(".safetensors"):
            os.remove(os.path.join(path, name))


def seal(output: str, files: list[str]) -> list[str]:
    """Write OUTPUT/digests.json over the files a conversion wrote; returns the list with the manifest added."""
    digests.write_manifest(output, digests.digest_tree(output, files))
    return [*files, digests.MANIFEST]


def convert_cli(args) -> int:
    if not args.overwrite:
        check_output_dir(args.output, overwrite=False)  # fail before loading anything
    if args.adapters and not export.is_stage_source(args.source):
        raise InputError(f"convert --adapters: {args.source} is not a run's stage (WORKDIR, WORKDIR/<stage> or its "
                         f"export); only a stage trained with model.lora has adapters to write")
    if args.peft and (args.source.startswith("preset:") or gguf.is_gguf(args.source)
                      or export.is_stage_source(args.source)):
        raise InputError(f"convert: --peft applies only to a Hugging Face directory source (the adapters' base), "
                         f"not {args.source}")
    if gguf.is_gguf(args.source):
        if args.head or args.stage:
            raise hf.HFFormatError("convert: --head applies only to preset:NAME sources, --stage only to a run "
                                   "(WORKDIR)")
        check_output_dir(args.output, args.overwrite)
        out = gguf.convert(args.source, args.output, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 1e9))
        c = out["config"]
        print(f"wrote {args.output}: LlamaForCausalLM from GGUF ({c.num_layers} layers, width {c.hidden_size}, "
              f"vocab {c.vocab_size}, {c.param_dtype}), {', '.join(seal(args.output, out['files']))}")
        return 0
    if export.is_stage_source(args.source):
        ref = export.resolve_stage(args.source, args.stage)
        if args.adapters:
            if args.dtype:
                raise InputError("convert --adapters writes the adapters in their own dtype; leave out --dtype")
            check_output_dir(args.output, args.overwrite)
            info = export.export_peft(ref, args.output)
            print(f"wrote {args.output}: stage {info['stage']}'s LoRA adapters as a PEFT directory (rank "
                  f"{info['rank']}, {', '.join(info['targets'])}; base {info['base']}), "
                  f"{', '.join(seal(args.output, info['files']))}")
            return 0
        check_output_dir(args.output, args.overwrite)
        info = export.export_hf(ref, args.output, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 1e9))
        print(f"wrote {args.output}: stage {info['stage']} as {info['class']}, {info['parameters']:,} parameters "
              f"({info['dtype']}), template {info['template']}, stop ids {info['stop_ids']}, "
              f"{', '.join(seal(args.output, info['files']))}")
        return 0
    if args.stage:
        raise hf.HFFormatError(f"convert: --stage applies only to a run (WORKDIR) source, not {args.source}")
    if args.source.startswith("preset:"):
        overrides = {"head": args.head} if args.head else {}
        if args.dtype:
            overrides["param_dtype"] = args.dtype
        config = models.get_preset(args.source[len("preset:"):], **overrides)
        params = models.init_params(config, jax.random.key(args.seed))
    else:
        if args.head:
            raise SystemExit("convert: --head applies only to preset:NAME sources")
        config, params = hf.load(args.source, dtype=args.dtype)
    merged = ""
    if args.peft:  # base + scale * A @ B folded into the weights: a plain HF directory
        adapted_config, adapted, options = peft.apply(args.peft, config, params)
        params = models.lora.merge(adapted, adapted_config)
        merged = f", PEFT adapter {args.peft} merged (r={options.rank}, {', '.join(options.targets)})"
    check_output_dir(args.output, args.overwrite)
    files = seal(args.output, hf.save(args.output, config, params, max_shard_bytes=int(args.max_shard_gb * 1e9)))
    n = models.count_params(params)
    print(f"wrote {args.output}: {hf.HF_CLASS[(config.architecture, config.head)]}, {n:,} parameters "
          f"({config.param_dtype}){merged}, {', '.join(files)}")
    return 0
