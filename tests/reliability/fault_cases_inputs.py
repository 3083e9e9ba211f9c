"""The fault sweep's cases, part 2: bad inputs a new user gives each command (train, config files, eval,
datasets, base2new, summarize, convert, zeroshot, bench) and the Python API."""
from __future__ import annotations

import json
import os
import shutil

import torch

from tests.reliability.fault_harness import case, guarded, run_api, run_cli

TRAIN, CONFIG, EVAL, DATA, B2N = "train", "train --config", "eval", "datasets", "base2new"
SUMM, CONV, ZS, BENCH, API = "summarize", "convert", "zeroshot", "bench", "API"


def cli(name, group, what, argv, names=(), expect="refuse", guard=None, **kw):
    """Register a case running ``fastprompt argv(sweep)`` in this process; ``guard(sweep)``: paths that must
    come out unchanged."""

    def run(s):
        args = argv(s)
        return guarded(guard(s) if guard else [], lambda: run_cli(args))

    run.__name__ = name
    case(group, what, expect, names, **kw)(run)


def _copy_run(s, tag):
    run = s.fresh(tag)
    shutil.copytree(s.good_run, run)
    return run


def _kept(s, key):
    """A copy of the finished run for the cases named ``key`` (made once, on first use)."""
    return s.memo(key, lambda: _copy_run(s, key))


def _converted(s):
    """Where ``convert_good`` writes the adapter that a later failing convert must leave alone."""
    return s.memo("converted", lambda: s.fresh("converted"))


# ---------------------------------------------------------------------------------------------- train
cli("train_unknown_dataset", TRAIN, "`train --dataset imagenett` (typo)",
    lambda s: s.run_args("--dataset", "imagenett"), ("imagenett",))
cli("train_root_missing", TRAIN, "`train --root /no/such/folder`",
    lambda s: s.run_args("--root", os.path.join(s.fresh("nothing"), "data")), ("--root",))
cli("train_root_without_dataset", TRAIN, "`train --root EMPTY_FOLDER` (the dataset is not there)",
    lambda s: s.run_args("--root", _empty_dir(s)), ("caltech101",))
cli("train_no_dataset", TRAIN, "`train` without --dataset",
    lambda s: [a for a in s.run_args() if a not in ("--dataset", "caltech101")], ("--dataset",))
cli("train_shots_zero", TRAIN, "`train --shots 0`", lambda s: s.run_args("--shots", "0"), ("--shots",))
cli("train_shots_too_many", TRAIN, "`train --shots 100` (classes have 2 training images)",
    lambda s: s.run_args("--shots", "100"), ("--shots",))
cli("train_epochs_zero", TRAIN, "`train --epochs 0`", lambda s: s.run_args("--epochs", "0"), ("--epochs",))
cli("train_lr_not_a_number", TRAIN, "`train --lr abc`", lambda s: s.run_args("--lr", "abc"), ("--lr",))
cli("train_unknown_method", TRAIN, "`train --method coopp` (typo)", lambda s: s.run_args("--method", "coopp"),
    ("coopp",))
cli("train_unknown_architecture", TRAIN, "`train --model ViT-Q-99`", lambda s: s.run_args("--model", "ViT-Q-99"),
    ("ViT-Q-99",))
cli("train_model_json_missing", TRAIN, "`train --model /no/such/model.json`",
    lambda s: s.run_args("--model", os.path.join(s.fresh("nothing"), "model.json")), ("model.json",))
cli("train_model_json_not_a_config", TRAIN, "`train --model other.json` (valid JSON, not a model config)",
    lambda s: s.run_args("--model", s.write("other.json", json.dumps({"lr": 0.1}))), ("other.json",))
cli("train_output_dir_is_a_file", TRAIN, "`train --output-dir FILE` (an existing file)",
    lambda s: s.run_args(out=s.write("occupied", "x")), ("occupied", "--output-dir"))
cli("train_into_finished_run", TRAIN, "`train` again into a finished run's --output-dir, without --resume",
    lambda s: s.run_args(out=_kept(s, "train-again")), ("--resume",), guard=lambda s: [_kept(s, "train-again")])
cli("train_resume_other_settings", TRAIN, "`train --resume` of a finished run with another --lr",
    lambda s: s.run_args("--resume", "--lr", "0.5", out=_kept(s, "resume-other")), ("lr",),
    guard=lambda s: [_kept(s, "resume-other")])
cli("train_tensorboard_missing", TRAIN, "`train --tensorboard DIR` without the tensorboard package",
    lambda s: s.run_args("--tensorboard", s.fresh("tb")), ("tensorboard",))
cli("train_device_cuda_without_gpu", TRAIN, "`train --device cuda` on a machine without a GPU",
    lambda s: s.run_args("--device", "cuda"), ("cuda",))
cli("train_opts_odd", TRAIN, "`train --opts OPTIM.LR` (no value)", lambda s: s.run_args("--opts", "OPTIM.LR"),
    ("--opts",))
cli("train_opts_unknown_key", TRAIN, "`train --opts OPTIM.LRR 0.1` (typo)",
    lambda s: s.run_args("--opts", "OPTIM.LRR", "0.1"), ("OPTIM.LRR",))


def _empty_dir(s):
    path = s.fresh("empty-root")
    os.makedirs(path)
    return path


@case(TRAIN, "`train --batch-size 64` with 6 training images: trains on them (or refuses), never a run with no "
      "step", "accept")
def train_batch_larger_than_data(s):
    out = s.fresh("bigbatch")
    o = run_cli(s.run_args("--batch-size", "64", out=out))
    if o.code == 0:
        with open(os.path.join(out, "log.jsonl")) as f:
            epochs = [json.loads(line) for line in f if '"epoch"' in line]
        seen = [e.get("images", 0) for e in epochs if e.get("event") == "epoch"]
        if not seen or min(seen) == 0:
            o.wrong = f"epochs ran without a training step (images per epoch {seen}), yet results were written"
    return o


# ---------------------------------------------------------------------------------------------- config files
def _config(s, text, suffix=".yaml"):
    return s.run_args("--config", s.write("config" + suffix, text))


cli("config_missing", CONFIG, "`train --config /no/such.yaml`",
    lambda s: s.run_args("--config", os.path.join(s.fresh("nothing"), "such.yaml")), ("such.yaml",))
cli("config_garbage_yaml", CONFIG, "`train --config` a file that is not YAML ('OPTIM: [1, 2')",
    lambda s: _config(s, "OPTIM: [1, 2\n  LR: {"), ("config.yaml",))
cli("config_unknown_key", CONFIG, "`train --config` with OPTIM.LRR (typo)",
    lambda s: _config(s, "OPTIM:\n  LRR: 0.1\n"), ("LRR",))
cli("config_wrong_type", CONFIG, "`train --config` with 'OPTIM: {LR: fast}'",
    lambda s: _config(s, "OPTIM:\n  LR: fast\n"), ("LR",))
cli("config_top_level_list", CONFIG, "`train --config` whose top level is a list",
    lambda s: _config(s, "- 1\n- 2\n"), ("config.yaml",))


# ---------------------------------------------------------------------------------------------- eval
def _eval(s, run, *extra):
    return ["eval", "--run", run, "--dataset", "caltech101", "--device", "cpu", "--num-workers", "0",
            "--no-progress"] + list(extra)


def _run_with_cut_adapter(s):
    run = _copy_run(s, "cut-adapter")
    path = os.path.join(run, "adapter", "prompt_learner.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return run


cli("eval_run_missing", EVAL, "`eval --run /no/such/run`",
    lambda s: _eval(s, os.path.join(s.fresh("nothing"), "missing-run")), ("missing-run",))
cli("eval_run_empty_dir", EVAL, "`eval --run EMPTY_FOLDER` (not a training run)",
    lambda s: _eval(s, _empty_dir(s)), ("empty-root",))
cli("eval_truncated_adapter", EVAL, "`eval --run` whose adapter weights are truncated",
    lambda s: _eval(s, _run_with_cut_adapter(s)), ("prompt_learner.safetensors",))
cli("eval_unknown_dataset", EVAL, "`eval --dataset nope`",
    lambda s: _eval(s, s.good_run)[:4] + ["nope", "--device", "cpu", "--no-progress"], ("nope",))
cli("eval_run_is_adapter_dir", EVAL, "`eval --run RUN/adapter` (the adapter folder instead of the run)",
    lambda s: _eval(s, os.path.join(s.good_run, "adapter")), ("adapter",))
cli("eval_good_run", EVAL, "`eval` of a finished run (its adapter, results and checkpoint stay as they are)",
    lambda s: _eval(s, _kept(s, "eval-good")), expect="accept",
    guard=lambda s: [os.path.join(_kept(s, "eval-good"), p) for p in ("adapter", "results.json", "checkpoint.pt")])


# ---------------------------------------------------------------------------------------------- datasets, base2new
cli("datasets_root_missing", DATA, "`datasets --root /no/such/folder`",
    lambda s: ["datasets", "--root", os.path.join(s.fresh("nothing"), "missing-data"), "--dataset", "caltech101",
               "--no-progress"], ("missing-data",), report=True)
cli("datasets_unknown_dataset", DATA, "`datasets --dataset nope`",
    lambda s: ["datasets", "--root", s.root, "--dataset", "nope", "--no-progress"], ("nope",), report=True)
cli("base2new_negative_seed", B2N, "`base2new --seeds -1`", lambda s: s.run_args("--seeds", "-1", command="base2new"),
    ("seed",))
cli("base2new_unknown_dataset", B2N, "`base2new --dataset nope`",
    lambda s: s.run_args("--dataset", "nope", command="base2new"), ("nope",))
cli("base2new_shots_zero", B2N, "`base2new --shots 0`", lambda s: s.run_args("--shots", "0", command="base2new"),
    ("--shots",))


# ---------------------------------------------------------------------------------------------- summarize
def _garbage_results(s):
    folder = s.fresh("summ")
    good = os.path.join(folder, "good")
    shutil.copytree(s.good_run, good)
    bad = os.path.join(folder, "bad")
    os.makedirs(bad)
    shutil.copy(os.path.join(good, "run_config.json"), bad)
    with open(os.path.join(bad, "results.json"), "w") as f:
        f.write('{"accuracy": 5')
    return folder


cli("summarize_missing", SUMM, "`summarize /no/such/folder`",
    lambda s: ["summarize", os.path.join(s.fresh("nothing"), "missing-runs"), "--no-plot"], ("missing-runs",))
cli("summarize_garbage_results", SUMM, "`summarize` a folder where one run's results.json is truncated",
    lambda s: ["summarize", _garbage_results(s), "--no-plot"], ("results.json",), expect="warn")
cli("summarize_good", SUMM, "`summarize` a finished run", lambda s: ["summarize", s.good_run, "--no-plot"],
    expect="accept")


# ---------------------------------------------------------------------------------------------- convert
def _without(argv, *options):
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
        elif a in options:
            skip = 1
        else:
            out.append(a)
    return out


cli("convert_checkpoint_missing", CONV, "`convert --checkpoint /no/such/model.pth.tar-5`",
    lambda s: _swap(s.convert_args(), "--checkpoint", os.path.join(s.fresh("nothing"), "model.pth.tar-5")),
    ("model.pth.tar-5",))
cli("convert_garbage_checkpoint", CONV, "`convert --checkpoint garbage.pth` (not a checkpoint)",
    lambda s: _swap(s.convert_args(), "--checkpoint", s.write("garbage.pth", b"\x00garbage", binary=True)),
    ("garbage.pth",))
cli("convert_no_classes", CONV, "`convert` without --dataset or --classnames-file",
    lambda s: _without(s.convert_args(), "--dataset"), ("--classnames-file",))
cli("convert_classnames_file_missing", CONV, "`convert --classnames-file /no/such/names.txt`",
    lambda s: _without(s.convert_args(), "--dataset") + [
        "--classnames-file", os.path.join(s.fresh("nothing"), "names.txt")], ("names.txt",))
cli("convert_classnames_duplicates", CONV, "`convert --classnames-file` listing 'cat' twice",
    lambda s: _without(s.convert_args(), "--dataset") + [
        "--classnames-file", s.write("names.txt", "cat\ndog\ncat\n")], ("cat",))
cli("convert_classnames_binary", CONV, "`convert --classnames-file` that is a binary file, not text",
    lambda s: _without(s.convert_args(), "--dataset") + [
        "--classnames-file", s.write("names.bin", bytes(range(128, 256)), binary=True)], ("names.bin",))
cli("convert_classnames_empty", CONV, "`convert --classnames-file` that is empty",
    lambda s: _without(s.convert_args(), "--dataset") + [
        "--classnames-file", s.write("empty-names.txt", "\n\n")], ("empty-names.txt",))
cli("convert_option_without_value", CONV, "`convert --option n_ctx` (no =VALUE)",
    lambda s: s.convert_args("--option", "n_ctx"), ("--option",))
cli("convert_epoch_missing", CONV, "`convert --epoch 7` (only model.pth.tar-3 exists)",
    lambda s: s.convert_args("--epoch", "7"), ("model.pth.tar-7",))
cli("convert_good", CONV, "`convert` a Dassl CoOp folder", lambda s: s.convert_args(out=_converted(s)),
    expect="accept")
cli("convert_shape_mismatch_over_adapter", CONV, "`convert --option n_ctx=3` (checkpoint has 2) into a folder "
    "holding a good adapter: refused, the adapter kept", lambda s: s.convert_args("--option", "n_ctx=3",
                                                                                   out=_converted(s)),
    ("ctx",), guard=lambda s: [_converted(s)])


def _swap(argv, option, value):
    i = argv.index(option)
    return argv[: i + 1] + [value] + argv[i + 2:]


# ---------------------------------------------------------------------------------------------- zeroshot, bench
cli("zeroshot_unknown_dataset", ZS, "`zeroshot --dataset nope`",
    lambda s: s.run_args("--dataset", "nope", command="zeroshot"), ("nope",))
cli("zeroshot_no_output_dir", ZS, "`zeroshot` without --output-dir",
    lambda s: s.run_args(command="zeroshot")[:-2], ("--output-dir",))
cli("bench_classes_without_method", BENCH, "`bench --classes 5` (applies to --method/--step only)",
    lambda s: ["bench", "--classes", "5"], ("--classes",))


# ---------------------------------------------------------------------------------------------- data files
DATAF = "data files"


@case(DATAF, "grayscale (L) and RGBA PNG training images among RGB ones (converted to RGB)", "accept")
def grayscale_and_rgba_images(s):
    from PIL import Image

    root, _, splits = s.data_copy("modes")
    for datum, mode in zip(splits.train_x[:2], ("L", "RGBA")):
        Image.open(datum.impath).convert(mode).save(datum.impath, format="PNG")
    return run_cli(s.run_args(root=root))


@case(DATAF, "a training image listed in the split file but deleted from disk", names=("image_0000.jpg",))
def listed_image_deleted(s):
    root, _, splits = s.data_copy("deleted")
    os.remove(splits.train_x[0].impath)
    return run_cli(s.run_args(root=root))


def _cut_split(s, tag):
    root, split, _ = s.data_copy(tag)
    text = open(split).read()
    open(split, "w").write(text[: len(text) // 2])
    return root


cli("truncated_split_file", DATAF, "`train` on a root whose split_zhou_Caltech101.json is truncated",
    lambda s: s.run_args(root=_cut_split(s, "cutsplit")), ("split_zhou_Caltech101.json",))
cli("datasets_truncated_split_file", DATAF, "`datasets` on a root whose split_zhou_Caltech101.json is truncated",
    lambda s: ["datasets", "--root", _cut_split(s, "dcutsplit"), "--dataset", "caltech101", "--no-progress"],
    ("split_zhou_Caltech101.json",), report=True)


@case(DATAF, "a test image truncated after its header, decoded in a DataLoader worker (--num-workers 2)",
      names=("image_0003.jpg",))
def truncated_test_image_in_worker(s):
    root, _, splits = s.data_copy("cutworker")
    victim = splits.test[0].impath
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 3)
    return run_cli(s.run_args("--num-workers", "2", root=root))


def _imagefolder(s, tag):
    from fastprompt.datasets import make_synthetic_dataset

    root = s.fresh(tag)
    make_synthetic_dataset(root, "imagefolder", num_classes=3, images_per_class=4)
    return root


@case(DATAF, "imagefolder dataset with stray notes.txt and .DS_Store files in its class folders", "accept")
def imagefolder_stray_files(s):
    root = _imagefolder(s, "imagefolder-stray")
    for folder in {os.path.dirname(p) for p in _files(root)}:
        for name in ("notes.txt", ".DS_Store"):
            with open(os.path.join(folder, name), "w") as f:
                f.write("not an image")
    return run_cli(s.run_args("--dataset", "imagefolder", "--root", root))


@case(DATAF, "imagefolder dataset whose test/ holds a class folder that train/ lacks", names=("zebra",))
def imagefolder_unknown_test_class(s):
    root = _imagefolder(s, "imagefolder-extra")
    test = os.path.join(root, "test")
    some_class = os.path.join(test, sorted(os.listdir(test))[0])
    shutil.copytree(some_class, os.path.join(test, "zebra"))
    return run_cli(s.run_args("--dataset", "imagefolder", "--root", root))


def _files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith((".jpg", ".png"))]


@case(CONFIG, "`--config` giving DATASET.ROOT as ~/data (home-relative; no shell to expand it)", "accept")
def config_root_with_tilde(s):
    config = s.write("config.yaml", "DATASET:\n  ROOT: ~/data\n")
    argv = _without(s.run_args(), "--root") + ["--config", config]
    return run_cli(argv, env={"HOME": s.base})  # ~/data is then the sweep's data root


@case(EVAL, "`eval --run` of a run stopped before it finished (checkpoint, no adapter)", names=("killed-run",
                                                                                                  "finish"))
def eval_unfinished_run(s):
    from fastprompt.training.config import TrainConfig
    from fastprompt.training.runner import train_run

    run = s.fresh("killed-run")
    train_run(TrainConfig(method="coop", model=s.model, pretrained=None, dataset="caltech101", root=s.root, shots=2,
                          epochs=2, batch_size=2, device="cpu", num_workers=0, progress=False, output_dir=run),
              stop_after_epoch=1)
    return run_cli(_eval(s, run))


def _convert_names(s, tag, content: bytes):
    out = s.fresh(tag)
    o = run_cli(_without(s.convert_args(out=out), "--dataset") + [
        "--classnames-file", s.write("names.txt", content, binary=True)])
    if o.code == 0:
        with open(os.path.join(out, "fastprompt_config.json")) as f:
            names = json.load(f)["classnames"]
        if names != ["cat", "dog", "car"]:
            o.wrong = f"class names read as {names}"
    return o


@case(CONV, "`convert --classnames-file` saved with Windows line endings (CRLF)", "accept")
def convert_classnames_crlf(s):
    return _convert_names(s, "crlf", b"cat\r\ndog\r\ncar\r\n")


@case(CONV, "`convert --classnames-file` starting with a UTF-8 byte-order mark (Notepad)", "accept")
def convert_classnames_bom(s):
    return _convert_names(s, "bom", "\ufeffcat\ndog\ncar\n".encode("utf-8"))


# ---------------------------------------------------------------------------------------------- Python API
def _api(name, what, fn, names=(), **kw):
    def run(s):
        return run_api(lambda: fn(s))

    run.__name__ = name
    case(API, what, names=names, api=True, **kw)(run)


def _create(s, method="coop", clip=True, names=("cat", "dog", "car"), **options):
    import fastprompt

    return fastprompt.create_learner(method, s.clip if clip else None, names, **options)


_api("api_unknown_method", "create_learner('coopp', ...)", lambda s: _create(s, "coopp"), ("coopp",))
_api("api_no_clip_model", "create_learner('coop', None, names)", lambda s: _create(s, clip=False), ("clip_model",))
_api("api_no_classnames", "create_learner('coop', clip, [])", lambda s: _create(s, names=[]), ("classnames",))
_api("api_classnames_string", "create_learner('coop', clip, 'cat dog car') (a string, not a list)",
     lambda s: _create(s, names="cat dog car"), ("classnames",))
_api("api_empty_classname", "create_learner('coop', clip, ['cat', ''])", lambda s: _create(s, names=["cat", ""]),
     ("empty",))
_api("api_classname_too_long", "a class name of 100 words (beyond the 77-token context)",
     lambda s: _create(s, names=["cat", "very long name " + " ".join(f"w{i}" for i in range(100))]),
     ("very long name",))
_api("api_unknown_option", "create_learner('coop', ..., nctx=4) (typo)", lambda s: _create(s, nctx=4), ("nctx",))
_api("api_wrong_image_size", "learner(images [2, 3, 64, 64]) on a 32 px CLIP",
     lambda s: _create(s)(torch.randn(2, 3, 64, 64, dtype=torch.float64)), ("64", "32"))
_api("api_from_pretrained_relative_missing", "from_pretrained('no_such_run/adapter') (a relative path that "
     "does not exist): fail fast", lambda s: _from_pretrained(s, "no_such_run/adapter"), ("no_such_run/adapter",),
     limit_s=30)
_api("api_from_pretrained_run_dir", "from_pretrained(RUN) (the training run, not its adapter folder)",
     lambda s: _from_pretrained(s, s.good_run), ("adapter",))


def _from_pretrained(s, directory):
    import fastprompt

    return fastprompt.from_pretrained(directory, clip_model=s.clip)
