"""Intake: every model/weights/data spec form on small real models and real digits images,
and every bad input the user can give (error class + a one-line message naming the problem)."""

from __future__ import annotations

import json
import sys
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

from autocompress import intake
from autocompress.errors import DataSpecError, InputError, ModelSpecError
from autocompress.intake import (
    Task,
    data_sources,
    load_data,
    load_for_profile,
    load_model,
    load_task,
    read_state_dict,
)

MODELS_PY = """
import torch
from torch import nn
from ac_sibling_width import WIDTH  # a sibling import: the file's folder must be importable


def build(num_classes=10):
    return nn.Sequential(
        nn.Conv2d(1, WIDTH, 3, padding=1), nn.BatchNorm2d(WIDTH), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDTH, num_classes),
    )


def flat_8x8():  # accepts only 1x8x8 input and has no num_classes parameter
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 4))


def broken(num_classes=10):
    raise RuntimeError("boom: factory exploded")


def not_a_model():
    return 42


class Zoo:
    @staticmethod
    def small(num_classes=10):
        return build(num_classes)
"""

DATA_PY = """
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

_d = load_digits()
X = torch.tensor(_d.images[:300], dtype=torch.float32).unsqueeze(1) / 16.0
Y = torch.tensor(_d.target[:300])


def pair():  # float images, already preprocessed the way the user's model expects
    return TensorDataset(X[:200], Y[:200]), TensorDataset(X[200:], Y[200:])


def as_dict():  # uint8 images with an explicit val part
    xu = (X * 255).to(torch.uint8)
    return {
        "train": TensorDataset(xu[:150], Y[:150]),
        "val": TensorDataset(xu[150:200], Y[150:200]),
        "test": TensorDataset(xu[200:], Y[200:]),
    }


def wrong_type():
    return [1, 2, 3]


def pil_images():
    img = Image.new("L", (8, 8))
    return [(img, 0), (img, 1)], [(img, 0)]


def string_labels():
    return [(X[0], "cat"), (X[1], "dog")], [(X[2], "cat")]


def one_class():
    return [(X[0], 0), (X[1], 0)], [(X[2], 0)]


def raises():
    raise OSError("dataset server unreachable")
"""


@contextmanager
def raises_one_line(error: type[Exception], *fragments: str) -> Iterator[None]:
    """The error class, a one-line message, and every fragment in it (case-insensitive)."""
    with pytest.raises(error) as info:
        yield
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), f"{fragment!r} not in {message!r}"


@pytest.fixture(scope="module")
def user_code(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder with a model file, a sibling module and an importable package of factories."""
    root = tmp_path_factory.mktemp("user_code")
    (root / "net.py").write_text(MODELS_PY)
    (root / "ac_sibling_width.py").write_text("WIDTH = 4\n")
    package = root / "ac_user_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(MODELS_PY.replace("from ac_sibling", "from .ac_sibling"))
    (package / "ac_sibling_width.py").write_text("WIDTH = 4\n")
    (package / "data.py").write_text(DATA_PY)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        yield root
    for name in [m for m in sys.modules if m.startswith("ac_user_pkg")]:
        del sys.modules[name]


DIGITS = load_digits()


def make_imagefolder(
    root: Path,
    parts: tuple[str, ...] = ("train", "test"),
    *,
    classes: tuple[int, ...] = (0, 1, 2),
    per_class: int = 10,
    rgb: bool = False,
    size: int = 8,
) -> dict[str, list[np.ndarray]]:
    """Real digits saved as PNG in ImageFolder layout; returns the stored arrays per part,
    in the order ImageFolder lists them (class by class, file name order)."""
    written: dict[str, list[np.ndarray]] = {}
    offset = 0
    for part in parts:
        written[part] = []
        for label in classes:
            images = DIGITS.images[DIGITS.target == label][offset : offset + per_class]
            folder = root / part / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                gray = (image * 15).astype(np.uint8)  # 0..16 -> 0..240
                if rgb:
                    array = np.stack([gray, 255 - gray, gray // 2], axis=-1)
                    img = Image.fromarray(array, "RGB")
                else:
                    img = Image.fromarray(gray, "L")
                if size != 8:
                    img = img.resize((size, size), Image.Resampling.NEAREST)
                img.save(folder / f"{i:03d}.png")
                stored = np.asarray(img)
                written[part].append(
                    stored[None] if stored.ndim == 2 else stored.transpose(2, 0, 1)
                )
        offset += per_class
    return written


# --------------------------------------------------------------------------------------
# Models: every spec form
# --------------------------------------------------------------------------------------


def test_torchvision_model_with_num_classes_and_input_size() -> None:
    model = load_model("torchvision:resnet18", None, num_classes=10, input_size=32)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.fc.out_features == 10
    assert not model.training
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_file_factory_gets_num_classes_and_can_import_siblings(user_code: Path) -> None:
    model = load_model(f"{user_code}/net.py:build", None, num_classes=3, input_size=8)
    assert isinstance(model, nn.Sequential)
    assert model[-1].out_features == 3
    assert not model.training


def test_package_module_factory_and_dotted_factory_name(user_code: Path) -> None:
    model = load_model("ac_user_pkg.models:build", None, num_classes=5, input_size=8)
    assert model[-1].out_features == 5
    nested = load_model("ac_user_pkg.models:Zoo.small", None, num_classes=2)
    assert nested[-1].out_features == 2


def test_demo_model_spec_is_the_demo_architecture() -> None:
    from autocompress.intake.demo import DemoNet

    model = load_model("demo", None, input_shape=(1, 8, 8))
    assert isinstance(model, DemoNet)
    assert model.fc.out_features == 10


def test_timm_spec_without_timm_says_how_to_install() -> None:
    try:
        import timm  # noqa: F401
    except ImportError:
        with raises_one_line(ModelSpecError, "timm is not installed", "pip install timm"):
            load_model("timm:resnet18", None)
    else:
        model = load_model("timm:resnet18", None, num_classes=4, input_size=32)
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_weights_as_bare_state_dict_are_loaded(user_code: Path, tmp_path: Path) -> None:
    spec = f"{user_code}/net.py:build"
    source = load_model(spec, None, num_classes=3)
    with torch.no_grad():  # make the BN buffers non-default too
        source[1].running_mean.uniform_()
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    fresh = load_model(spec, None, num_classes=3)
    assert not torch.equal(fresh[0].weight, source[0].weight)  # else the test proves nothing
    loaded = load_model(spec, path, num_classes=3, input_size=8)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_weights_inside_checkpoint_dict_with_module_prefix(
    user_code: Path, tmp_path: Path, key: str
) -> None:
    spec = f"{user_code}/net.py:build"
    source = load_model(spec, None, num_classes=3)
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}  # DataParallel save
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 7, "optimizer": {"lr": 0.1}, key: wrapped}, path)
    assert set(read_state_dict(path)) == set(source.state_dict())
    loaded = load_model(spec, path, num_classes=3)
    assert torch.equal(loaded[-1].weight, source[-1].weight)


# --------------------------------------------------------------------------------------
# Models: bad input
# --------------------------------------------------------------------------------------


def test_unknown_model_spec_form_suggests_torchvision() -> None:
    with raises_one_line(ModelSpecError, "unknown model spec 'resnet18'", "torchvision:resnet18"):
        load_model("resnet18", None)
    with raises_one_line(ModelSpecError, "unknown model spec", "torchvision:NAME"):
        load_model("onnx://some/model", None)


def test_hub_address_says_models_are_not_downloaded() -> None:
    with raises_one_line(ModelSpecError, "hf://some/model", "save_pretrained", "hf:DIR"):
        load_model("hf://some/model", None)


def test_unknown_torchvision_name_suggests_close_names() -> None:
    with raises_one_line(ModelSpecError, "'resnet181'", "did you mean", "torchvision:resnet18"):
        load_model("torchvision:resnet181", None)


def test_missing_model_file(tmp_path: Path) -> None:
    with raises_one_line(ModelSpecError, "does not exist", "missing.py"):
        load_model(f"{tmp_path}/missing.py:build", None)


def test_missing_factory_in_file_and_module(user_code: Path) -> None:
    with raises_one_line(ModelSpecError, "'buidl' not found", "did you mean build"):
        load_model(f"{user_code}/net.py:buidl", None)
    with raises_one_line(ModelSpecError, "'nope' not found"):
        load_model("ac_user_pkg.models:nope", None)


def test_missing_module(user_code: Path) -> None:
    with raises_one_line(ModelSpecError, "cannot import", "ac_no_such_module", "PYTHONPATH"):
        load_model("ac_no_such_module.models:build", None)


def test_model_file_that_fails_to_import(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("raise ValueError('syntax of my config is off')\n")
    with raises_one_line(ModelSpecError, "importing model file", "syntax of my config is off"):
        load_model(f"{tmp_path}/bad.py:build", None)


def test_factory_that_raises_reports_its_exception(user_code: Path) -> None:
    with raises_one_line(ModelSpecError, "raised RuntimeError", "boom: factory exploded"):
        load_model(f"{user_code}/net.py:broken", None)


def test_factory_returning_non_module(user_code: Path) -> None:
    with raises_one_line(ModelSpecError, "returned int", "not a torch.nn.Module"):
        load_model(f"{user_code}/net.py:not_a_model", None)


def test_missing_weights_file(user_code: Path, tmp_path: Path) -> None:
    with raises_one_line(ModelSpecError, "weights file", "does not exist"):
        load_model(f"{user_code}/net.py:build", tmp_path / "nope.pt")


@pytest.mark.parametrize("content", ["text", "list", "empty_dict", "no_tensors"])
def test_weights_that_are_not_a_checkpoint(user_code: Path, tmp_path: Path, content: str) -> None:
    path = tmp_path / "w.pt"
    if content == "text":
        path.write_text("these are not weights")
    elif content == "list":
        torch.save([1, 2, 3], path)
    elif content == "empty_dict":
        torch.save({}, path)
    else:
        torch.save({"epoch": 3, "state_dict": {"lr": 0.1}}, path)
    fragment = "not a PyTorch checkpoint" if content == "text" else "is not a checkpoint"
    with raises_one_line(ModelSpecError, fragment, str(path), "state_dict"):
        load_model(f"{user_code}/net.py:build", path)


def test_pickled_module_is_refused_on_purpose(user_code: Path, tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2)), path)  # a whole module, not a state_dict
    with raises_one_line(
        ModelSpecError, "refused on purpose", "arbitrary code", "torch.save(model.state_dict()"
    ):
        load_model(f"{user_code}/net.py:build", path)


def test_shape_mismatched_weights_are_listed(user_code: Path, tmp_path: Path) -> None:
    spec = f"{user_code}/net.py:build"
    path = tmp_path / "w3.pt"
    torch.save(load_model(spec, None, num_classes=3).state_dict(), path)
    with raises_one_line(
        ModelSpecError, "2 shape mismatch", "5.weight file [3, 4] vs model [5, 4]"
    ):
        load_model(spec, path, num_classes=5)


def test_missing_and_unexpected_keys_are_listed(user_code: Path, tmp_path: Path) -> None:
    spec = f"{user_code}/net.py:build"
    state = load_model(spec, None, num_classes=3).state_dict()
    del state["5.bias"]
    state["head.extra"] = torch.zeros(2)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with raises_one_line(ModelSpecError, "1 missing (5.bias)", "1 unexpected (head.extra)"):
        load_model(spec, path, num_classes=3)


def test_input_shape_the_model_rejects_names_shape_and_input_size(user_code: Path) -> None:
    with raises_one_line(ModelSpecError, "rejects input of shape (1, 1, 10, 10)", "--input-size"):
        load_model(f"{user_code}/net.py:flat_8x8", None, input_shape=(1, 10, 10))
    # the same factory is fine on the shape it was built for
    assert load_model(f"{user_code}/net.py:flat_8x8", None, input_shape=(1, 8, 8)) is not None
    # with input_size only, channels come from the first conv: 1 here, so 1x8x8 passes
    assert load_model(f"{user_code}/net.py:build", None, input_size=8) is not None


def test_output_classes_must_match(user_code: Path) -> None:
    with raises_one_line(ModelSpecError, "outputs 4 classes but 10", "--num-classes"):
        load_model(f"{user_code}/net.py:flat_8x8", None, num_classes=10, input_shape=(1, 8, 8))


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_num_classes_or_input_size(bad: object) -> None:
    with raises_one_line(ModelSpecError, "positive integer", str(bad)):
        load_model("demo", None, num_classes=bad)  # type: ignore[arg-type]
    with raises_one_line(InputError, "positive integer", str(bad)):
        load_model("demo", None, input_size=bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Data: digits splits
# --------------------------------------------------------------------------------------


def _index_sets(data: intake.DataSplits) -> dict[str, set[int]]:
    return {name: set(data.split(name).indices.tolist()) for name in intake.SPLIT_NAMES}


def test_digits_splits_are_stratified_disjoint_and_complete() -> None:
    data = load_data("digits", seed=0)
    sizes = data.describe()["sizes"]
    assert sum(sizes.values()) == 1797
    assert abs(sizes["train"] - 0.6 * 1797) < 12 and abs(sizes["val"] - 0.2 * 1797) < 12
    sets = _index_sets(data)
    assert not (
        sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"]
    )
    assert sets["train"] | sets["val"] | sets["test"] == set(range(1797))
    for name in ("val", "test"):
        counts = torch.bincount(data.split(name).y, minlength=10)
        expected = torch.bincount(torch.as_tensor(DIGITS.target), minlength=10) * 0.2
        assert ((counts - expected).abs() <= 1).all(), (name, counts)  # stratified per class
    # labels follow the images: stored pixels equal sklearn's at the recorded indices
    idx = data.val.indices
    assert torch.equal(data.val.x[:, 0].to(torch.float64), torch.as_tensor(DIGITS.images)[idx])
    assert torch.equal(data.val.y, torch.as_tensor(DIGITS.target)[idx])
    # a prefix of val mixes classes (seeded order, not class by class)
    assert len(set(data.val.y[:30].tolist())) >= 5


def test_digits_splits_are_deterministic_per_seed() -> None:
    a, b, c = load_data("digits", seed=0), load_data("digits", seed=0), load_data("digits", seed=1)
    assert a.describe()["split_sha256"] == b.describe()["split_sha256"]
    assert torch.equal(a.val.indices, b.val.indices)
    assert a.describe()["split_sha256"] != c.describe()["split_sha256"]
    assert _index_sets(a)["val"] != _index_sets(c)["val"]


def test_describe_is_plain_json_with_the_recorded_fields() -> None:
    data = load_data("digits", seed=3)
    record = json.loads(json.dumps(data.describe()))
    assert record["spec"] == "digits" and record["seed"] == 3
    assert record["classes"] == [str(i) for i in range(10)]
    assert record["input_shape"] == [1, 8, 8]
    assert len(record["split_sha256"]) == 64


def test_batches_are_preprocessed_float_nchw_and_normalised_on_train() -> None:
    data = load_data("digits")
    batches = list(data.batches("train", 256))
    assert [len(y) for _, y in batches][-1] == len(data.train) % 256  # short last batch
    x = torch.cat([xb for xb, _ in batches])
    assert x.dtype == torch.float32 and x.shape == (len(data.train), 1, 8, 8)
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-2
    assert torch.cat([y for _, y in batches]).dtype == torch.int64
    # shuffled order: deterministic for a seed, different for another, same samples
    first = [y for _, y in data.batches("val", 64, shuffle=True, seed=5)]
    again = [y for _, y in data.batches("val", 64, shuffle=True, seed=5)]
    other = [y for _, y in data.batches("val", 64, shuffle=True, seed=6)]
    assert all(torch.equal(p, q) for p, q in zip(first, again, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(first, other, strict=True))
    assert torch.equal(torch.cat(first).sort().values, data.val.y.sort().values)


def test_input_size_resizes_batches_and_example_input() -> None:
    data = load_data("digits", input_size=16)
    assert data.input_shape == (1, 16, 16) and data.stored_shape == (1, 8, 8)
    xb, _ = next(data.batches("test", 4))
    assert xb.shape == (4, 1, 16, 16)
    assert data.example_input(3).shape == (3, 1, 16, 16)


def test_unknown_split_and_bad_batch_size() -> None:
    data = load_data("digits")
    with raises_one_line(DataSpecError, "unknown split 'validation'"):
        next(data.batches("validation", 8))
    with raises_one_line(DataSpecError, "batch size", "0"):
        next(data.batches("val", 0))


# --------------------------------------------------------------------------------------
# Data: imagefolder
# --------------------------------------------------------------------------------------


def test_imagefolder_decodes_splits_and_reuses_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = make_imagefolder(tmp_path / "data", per_class=12)
    cache = tmp_path / "cache"
    spec = f"imagefolder:{tmp_path / 'data'}"
    data = load_data(spec, cache_dir=cache, seed=0)
    assert data.classes == ["0", "1", "2"]
    assert data.stored_shape == (1, 8, 8) and data.train.x.dtype == torch.uint8
    assert len(data.train) + len(data.val) == 36 and len(data.test) == 36
    assert set(data.val.y.tolist()) == {0, 1, 2}  # stratified: every class validates
    assert not set(data.train.indices.tolist()) & set(data.val.indices.tolist())
    for j, source_index in enumerate(data.test.indices.tolist()):  # pixels decoded exactly
        assert np.array_equal(data.test.x[j].numpy(), written["test"][source_index])
        assert data.test.y[j].item() == source_index // 12
    assert len(list((cache / "images").glob("*.npz"))) == 2  # train and test folders

    calls: list[Path] = []
    original = data_sources._decode_image

    def counting(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
        calls.append(path)
        return original(path, mode, size)

    monkeypatch.setattr(data_sources, "_decode_image", counting)
    again = load_data(spec, cache_dir=cache, seed=0)
    assert calls == []  # nothing decoded: served from the cache
    assert torch.equal(again.train.x, data.train.x)
    assert again.describe()["split_sha256"] == data.describe()["split_sha256"]

    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(tmp_path / "data/train/1/999.png")
    grown = load_data(spec, cache_dir=cache, seed=0)
    assert len(calls) == 37  # the changed train folder decoded again, test still cached
    assert len(grown.train) + len(grown.val) == 37


def test_imagefolder_rgb_with_input_size_feeds_a_torchvision_model(tmp_path: Path) -> None:
    make_imagefolder(tmp_path, ("train", "val"), rgb=True, size=12, per_class=8)
    task = load_task(
        "torchvision:resnet18",
        None,
        f"imagefolder:{tmp_path}",
        input_size=32,
        cache_dir=tmp_path / "cache",
    )
    assert task.input_shape == (3, 32, 32) and task.num_classes == 3
    assert task.model.fc.out_features == 3 and not task.model.training
    assert task.data.stored_shape == (3, 32, 32)  # decoded once at the requested size
    assert len(task.data.test) == 24  # the only held-out folder (val/) became test
    xb, _ = next(task.data.batches("train", 5))
    assert xb.shape == (5, 3, 32, 32)
    # train-split statistics normalise each channel
    x = torch.cat([b for b, _ in task.data.batches("train", 64)])
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-3


def test_imagefolder_with_val_and_test_folders_uses_both(tmp_path: Path) -> None:
    make_imagefolder(tmp_path, ("train", "val", "test"), per_class=5)
    data = load_data(f"imagefolder:{tmp_path}", cache_dir=tmp_path / "cache")
    assert (len(data.train), len(data.val), len(data.test)) == (15, 15, 15)
    assert "as given" in data.describe()["split_method"]


def test_imagefolder_bad_inputs(tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    def load(root: Path) -> None:
        load_data(f"imagefolder:{root}", cache_dir=cache)

    with raises_one_line(DataSpecError, "does not exist", "nowhere"):
        load(tmp_path / "nowhere")

    no_train = tmp_path / "no_train"
    (no_train / "test" / "0").mkdir(parents=True)
    with raises_one_line(DataSpecError, "no train folder", "train/<class>"):
        load(no_train)

    no_held_out = tmp_path / "no_held_out"
    make_imagefolder(no_held_out, ("train",), per_class=3)
    with raises_one_line(DataSpecError, "no val or test folder"):
        load(no_held_out)

    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    (flat / "test").mkdir()
    Image.new("L", (8, 8)).save(flat / "train" / "a.png")
    with raises_one_line(DataSpecError, "no class folders", "train"):
        load(flat)

    one_class = tmp_path / "one_class"
    make_imagefolder(one_class, classes=(4,), per_class=3)
    with raises_one_line(DataSpecError, "only one class folder (4)", "at least 2"):
        load(one_class)

    no_images = tmp_path / "no_images"
    for part in ("train", "test"):
        for label in ("a", "b"):
            (no_images / part / label).mkdir(parents=True)
            (no_images / part / label / "notes.txt").write_text("not an image")
    with raises_one_line(DataSpecError, "no images in", "train"):
        load(no_images)

    empty_test = tmp_path / "empty_test"
    make_imagefolder(empty_test, ("train",), per_class=3)
    (empty_test / "test" / "0").mkdir(parents=True)
    with raises_one_line(DataSpecError, "no images in", "test"):
        load(empty_test)

    empty_class = tmp_path / "empty_class"
    make_imagefolder(empty_class, per_class=3)
    (empty_class / "train" / "9").mkdir()
    with raises_one_line(DataSpecError, "class folder(s) 9", "hold no images"):
        load(empty_class)

    extra_test_class = tmp_path / "extra_test_class"
    make_imagefolder(extra_test_class, per_class=3)
    (extra_test_class / "test" / "cat").mkdir()
    with raises_one_line(DataSpecError, "class folders not in train: cat"):
        load(extra_test_class)

    tiny = tmp_path / "tiny"  # one image per class: nothing left to validate on
    make_imagefolder(tiny, per_class=1)
    with raises_one_line(DataSpecError, "val split", "is empty"):
        load(tiny)

    corrupt = tmp_path / "corrupt"
    make_imagefolder(corrupt, per_class=3)
    (corrupt / "train" / "1" / "zzz.png").write_text("not a png")
    with raises_one_line(DataSpecError, "cannot read image", "zzz.png"):
        load(corrupt)


# --------------------------------------------------------------------------------------
# Data: cifar10 and factories
# --------------------------------------------------------------------------------------


class _FakeCIFAR10:
    """Stands in for torchvision's CIFAR10 (same attributes) so no 170 MB download runs."""

    def __init__(self, root: str, train: bool, download: bool) -> None:
        self.classes = [f"class{i}" for i in range(10)]
        n = 60 if train else 20
        self.data = np.random.default_rng(int(train)).integers(0, 256, (n, 32, 32, 3), np.uint8)
        self.targets = [i % 10 for i in range(n)]


def test_cifar10_arrays_become_nchw_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCIFAR10)
    data = load_data(f"cifar10:{tmp_path}", seed=0)
    assert data.stored_shape == (3, 32, 32) and data.num_classes == 10
    assert (len(data.train), len(data.val), len(data.test)) == (50, 10, 20)
    assert set(data.val.y.tolist()) == set(range(10))
    source = _FakeCIFAR10("", train=False, download=False)
    j = 3
    expected = torch.from_numpy(source.data[data.test.indices[j].item()]).permute(2, 0, 1)
    assert torch.equal(data.test.x[j], expected)


def test_cifar10_without_network_suggests_imagefolder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with raises_one_line(DataSpecError, "could not download CIFAR-10", "imagefolder:ROOT"):
        load_data(f"cifar10:{tmp_path}")


def test_data_factory_float_pair_is_used_as_preprocessed(user_code: Path) -> None:
    data = load_data("ac_user_pkg.data:pair", seed=0)
    assert data.num_classes == 10 and data.stored_shape == (1, 8, 8)
    assert len(data.train) + len(data.val) == 200 and len(data.test) == 100
    assert data.mean == (0.0,) and data.std == (1.0,)
    xb, yb = next(data.batches("test", 100))
    source = torch.tensor(DIGITS.images[200:300], dtype=torch.float32).unsqueeze(1) / 16.0
    assert torch.allclose(xb, source[data.test.indices])
    assert torch.equal(yb, torch.as_tensor(DIGITS.target[200:300])[data.test.indices])


def test_data_factory_dict_with_val_and_uint8_images(user_code: Path) -> None:
    data = load_data("ac_user_pkg.data:as_dict")
    assert (len(data.train), len(data.val), len(data.test)) == (150, 50, 100)
    assert data.train.x.dtype == torch.uint8 and data.std[0] != 1.0  # train statistics


@pytest.mark.parametrize(
    ("factory", "fragments"),
    [
        ("wrong_type", ("returned list", "(train_dataset, test_dataset)")),
        ("pil_images", ("input is Image", "apply ToTensor")),
        ("string_labels", ("label 'cat'", "ints >= 0")),
        ("one_class", ("only one class",)),
        ("raises", ("raised OSError", "dataset server unreachable")),
        ("missing", ("'missing' not found",)),
    ],
)
def test_data_factory_bad_inputs(user_code: Path, factory: str, fragments: tuple[str, ...]) -> None:
    with raises_one_line(DataSpecError, *fragments):
        load_data(f"ac_user_pkg.data:{factory}")


@pytest.mark.parametrize("spec", ["mnist", "imagenet:/data", "", "folder/with space:x"])
def test_unknown_data_spec(spec: str) -> None:
    with raises_one_line(DataSpecError, "data spec", "imagefolder:ROOT"):
        load_data(spec)


def test_bad_input_size_for_data() -> None:
    with raises_one_line(DataSpecError, "input size", "positive integer"):
        load_data("digits", input_size=0)


# --------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------


def test_task_from_file_factory_and_weights_on_digits(user_code: Path, tmp_path: Path) -> None:
    spec = f"{user_code}/net.py:build"
    path = tmp_path / "w.pt"
    torch.save(load_model(spec, None, num_classes=10).state_dict(), path)
    task = load_task(spec, str(path), "digits", seed=2, cache_dir=tmp_path)
    assert task.num_classes == 10 and task.input_shape == (1, 8, 8)
    assert task.model_spec == spec and task.data_spec == "digits" and task.weights == str(path)
    assert not task.model.training
    assert task.data.describe()["seed"] == 2


def test_task_model_without_data_asks_for_data() -> None:
    with raises_one_line(DataSpecError, "--model torchvision:resnet18 needs --data"):
        load_task("torchvision:resnet18", None, None)


def test_task_data_without_model_outside_the_demo(user_code: Path) -> None:
    with raises_one_line(ModelSpecError, "demo model is trained on digits only", "--model"):
        load_task(None, None, "ac_user_pkg.data:pair")


def test_task_model_rejecting_the_data_shape() -> None:
    # resnet18 wants 3 channels; digits have 1
    with raises_one_line(ModelSpecError, "rejects input of shape (1, 1, 8, 8)", "--input-size"):
        load_task("torchvision:resnet18", None, "digits")


def test_task_num_classes_below_data_classes(user_code: Path) -> None:
    with raises_one_line(ModelSpecError, "--num-classes 3 is less than the 10 classes"):
        load_task(f"{user_code}/net.py:build", None, "digits", num_classes=3)


# --------------------------------------------------------------------------------------
# Profile intake (model without data)
# --------------------------------------------------------------------------------------


def test_profile_intake_without_anything_is_the_trained_demo(demo_task: Task) -> None:
    model, example = load_for_profile(None, None, None)
    assert example.shape == (1, 1, 8, 8) and not model.training
    assert torch.equal(model.fc.weight, demo_task.model.fc.weight)


def test_profile_intake_takes_the_shape_from_flag_or_model(user_code: Path) -> None:
    model, example = load_for_profile("torchvision:resnet18", None, None, input_size=32)
    assert example.shape == (1, 3, 32, 32) and model.fc.out_features == 1000
    model, example = load_for_profile(
        f"{user_code}/net.py:build", None, None, num_classes=4, input_shape=(1, 12, 12)
    )
    assert example.shape == (1, 1, 12, 12) and model(example).shape == (1, 4)


def test_profile_intake_bad_shapes(user_code: Path) -> None:
    with raises_one_line(ModelSpecError, "--input-shape must be C,H,W", "(1, 8)"):
        load_for_profile("torchvision:resnet18", None, None, input_shape=(1, 8))
    with raises_one_line(ModelSpecError, "differs from the data's (1, 8, 8)"):
        load_for_profile(f"{user_code}/net.py:build", None, "digits", input_shape=(3, 8, 8))
