"""The unmutated seeds load and run through the worker: a fuzz run starts from valid files."""
from shared_data import shared_file


def test_every_seed_loads_and_runs(seeds, meta_seed, bytelevel_tokenizer, fuzzers, fuzz_root):
    fuzz = fuzzers["unmutated"]
    llama2c = shared_file("models", "llama2c")
    cases = [dict(path=llama2c / n) for n in ("stories260K.bin", "stories260K_v1.bin", "stories260K_q80_gs4.bin")]
    cases += [dict(path=p) for p in seeds.values()]
    cases += [dict(path=meta_seed, export=True),
              dict(path=shared_file("models", "hf", "stories260K-f32"), export=True),
              dict(path=shared_file("models", "gptq", "stories260K-gptq-4bit-g32-actorder")),
              dict(path=llama2c / "stories260K.bin", tokenizer=llama2c / "tok512.bin"),
              dict(path=llama2c / "stories260K.bin",
                   tokenizer=shared_file("models", "hf", "stories260K", "tokenizer.json")),
              dict(path=llama2c / "stories260K.bin", tokenizer=bytelevel_tokenizer)]
    for case in cases:
        d = fuzz.scratch()
        if case.get("export"):  # exported beside the copy, not into ../shared
            import shutil

            case["path"] = shutil.copytree(case["path"], d / "model")
        result = fuzz.load(d, **case)
        assert result["outcome"] == "ran" and result["finite"], (case, result)
