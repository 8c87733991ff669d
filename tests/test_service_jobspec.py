"""A submitted job checked field by field (each refusal names its field), the stored spec
turned into a SearchConfig, and uploads: size limits while streaming, archives whose members
could escape, weights that are no state_dict, a folder and an S3 store."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

from autocompress.errors import InputError
from autocompress.service import uploads
from autocompress.service.jobspec import JobSpecError, check_submission, to_config


def _check(body: dict[str, Any], files: dict[str, Any] | None = None, *,
           code: bool = False) -> dict[str, Any]:
    return check_submission(body, files or {}, allow_code=code,
                            dataset_exists=lambda name: name == "flowers")


@pytest.mark.parametrize(("body", "files", "field", "words"), [
    ({"study": "mine"}, {}, "study", "cannot be set"),
    ({"storage": "sqlite:///x.db"}, {}, "storage", "cannot be set"),
    ({"artifacts": "/tmp"}, {}, "artifacts", "cannot be set"),
    ({"config": "studies/demo.yaml"}, {}, "config", "cannot be set"),
    ({"task": "t.py:make"}, {}, "task", "cannot be set"),
    ({"colour": "red"}, {}, "colour", "unknown option"),
    ({"model": "/srv/models/net.py:build"}, {}, "model", "server path"),
    ({"model": "hf:../../etc"}, {}, "model", "not accepted"),
    ({"model": "hf:org/name/../x"}, {}, "model", "not accepted"),
    ({"model": "pkg.module:factory"}, {}, "model", "not accepted"),
    ({"model": "timm:resnet18", "weights": "/srv/w.pt"}, {}, "weights", "uploaded file"),
    ({"data": "imagefolder:/srv/data"}, {}, "data", "server path"),
    ({"data": "dataset:tulips"}, {}, "data", "not registered"),
    ({"trials": 0}, {}, "trials", "at least 1"),
    ({"trials": "5"}, {}, "trials", "integer"),
    ({"budget": "-5ms"}, {}, "budget", "positive"),
    ({"budgets": ["fast"]}, {}, "budgets", "budget"),
    ({"objectives": "size,accuracy"}, {}, "objectives", "start with accuracy"),
    ({"sampler": "bayes"}, {}, "sampler", "unknown"),
    ({"target": "tpu"}, {}, "target", "unknown"),
    ({"time_limit": -1}, {}, "time_limit", "positive"),
    ({"kd_temperature_min": 20}, {}, "kd_temperature_min", "kd_temperature_max"),
    ({"train_threads": -1}, {}, "train_threads", ">= 0"),
    ({}, {"model_file": ("net.py", 10)}, "model_file", "does not accept model code"),
    ({}, {"weights": ("w.pt", 10)}, "model", "need the model"),
    ({}, {"data": ("d.rar", 10)}, "data", ".zip"),
    ({"data": "digits"}, {"data": ("d.zip", 10)}, "data", "not both"),
    ({"data_options": "tokenizer=/srv"}, {"data": ("d.csv", 10)}, "data_options",
     "not accepted"),
    ({"factory": "build"}, {}, "factory", "model_file"),
    ({}, {"extra": ("x.bin", 1)}, "extra", "unknown file field"),
])
def test_refusals_name_their_field(body: dict[str, Any], files: dict[str, Any], field: str,
                                   words: str) -> None:
    with pytest.raises(JobSpecError, match=words) as info:
        _check(body, files)
    assert info.value.field == field
    assert "\n" not in str(info.value)


def test_accepted_spec_is_plain_json_with_the_clis_values() -> None:
    spec = _check({"model": "torchvision:resnet18", "data": "dataset:flowers",
                   "budget": "8MB", "objectives": "accuracy,size,latency", "trials": 3,
                   "bits": "8,4", "time_limit": 2, "finetune_steps": 10, "seed": 1,
                   "learning_rate": None}, {"weights": ("resnet.pt", 100)})
    assert spec == {"model": "torchvision:resnet18", "data": "dataset:flowers",
                    "budgets": ["8MB"], "objectives": ["accuracy", "size", "latency"],
                    "trials": 3, "bits": [8, 4], "time_limit": 2.0, "finetune_steps": 10,
                    "seed": 1, "uploads": {"weights": "resnet.pt"}}
    assert _check({}) == {"model": "demo", "data": "digits", "trials": 20}
    assert _check({"model": "hf:acme/bert-tiny"})["model"] == "hf:acme/bert-tiny"
    coded = _check({"factory": "make_net"}, {"model_file": ("net.py", 10)}, code=True)
    assert (coded["model"], coded["factory"]) == ("file", "make_net")


def test_to_config_maps_uploads_datasets_and_options(tmp_path: Path) -> None:
    spec = _check({"model": "timm:resnet18", "trials": 2, "latency_repeats": 3},
                  {"weights": ("w.pt", 1), "data": ("flowers.zip", 1)})
    (tmp_path / "data" / "flowers" / "train").mkdir(parents=True)
    config = to_config(spec, study="job-1", storage="sqlite:///s.db", artifacts=str(tmp_path),
                       files_dir=tmp_path, dataset_spec=lambda name: None)
    assert (config.model, config.weights, config.data) == (
        "timm:resnet18", str(tmp_path / "weights" / "w.pt"),
        f"imagefolder:{tmp_path / 'data' / 'flowers'}")
    assert (config.study, config.storage, config.trials, config.latency_repeats) == (
        "job-1", "sqlite:///s.db", 2, 3)
    text = to_config(_check({"data_options": "text=review"}, {"data": ("r.csv", 1)}),
                     study="j", storage="sqlite:///s.db", artifacts=None, files_dir=tmp_path,
                     dataset_spec=lambda name: None)
    assert text.data == f"text:{tmp_path / 'data' / 'r.csv'}?text=review" and text.model is None
    named = to_config(_check({"data": "dataset:flowers"}), study="j", storage="sqlite:///s.db",
                      artifacts=None, files_dir=tmp_path,
                      dataset_spec=lambda name: "imagefolder:/srv/flowers")
    assert named.data == "imagefolder:/srv/flowers"
    with pytest.raises(InputError, match="no longer registered"):
        to_config(_check({"data": "dataset:flowers"}), study="j", storage="sqlite:///s.db",
                  artifacts=None, files_dir=tmp_path, dataset_spec=lambda name: None)
    coded = to_config(_check({}, {"model_file": ("net.py", 1)}, code=True), study="j",
                      storage="sqlite:///s.db", artifacts=None, files_dir=tmp_path,
                      dataset_spec=lambda name: None)
    assert coded.model == f"{tmp_path / 'model_file' / 'net.py'}:build_model"


def _zip(members: dict[str, bytes]) -> io.BytesIO:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    out.seek(0)
    return out


def _stored(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("member", ["../evil", "train/../../evil", "/etc/evil", "C:/evil"])
def test_archive_member_that_escapes_is_refused_and_nothing_kept(tmp_path: Path,
                                                                 member: str) -> None:
    art = tmp_path / "art"
    with pytest.raises(JobSpecError, match="member") as info:
        uploads.save_uploads(str(art), "a" * 12, {"data": ("d.zip", _zip({member: b"x"}))})
    assert info.value.field == "data" and repr(member) in str(info.value)
    assert _stored(art) == []


def test_tar_links_and_devices_are_refused(tmp_path: Path) -> None:
    for kind in (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w:gz") as archive:
            info = tarfile.TarInfo("train/a/x.png")
            info.type, info.linkname = kind, "/etc/passwd"
            archive.addfile(info)
        raw.seek(0)
        with pytest.raises(JobSpecError, match="link or a device"):
            uploads.save_uploads(str(tmp_path), "a" * 12, {"data": ("d.tar.gz", raw)})


class _Endless(io.RawIOBase):
    """A stream that never ends: an upload must stop being read past its limit."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        size = 65536 if size is None or size < 0 else size
        self.read_bytes += size
        return b"x" * size


def test_size_limit_enforced_while_streaming(tmp_path: Path) -> None:
    stream = _Endless()
    limits = uploads.UploadLimits(weights_bytes=100_000)
    with pytest.raises(JobSpecError, match=r"over its limit of 97\.66 KB") as info:
        uploads.save_uploads(str(tmp_path), "b" * 12, {"weights": ("w.pt", stream)}, limits)
    assert info.value.field == "weights" and stream.read_bytes <= 100_001
    assert _stored(tmp_path) == []


def test_folder_round_trip_and_weights_that_are_no_state_dict(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    art, job = str(tmp_path / "art"), "c" * 12

    def weights(obj: object) -> io.BytesIO:
        raw = io.BytesIO()
        torch.save(obj, raw)
        raw.seek(0)
        return raw

    spec = _check({"model": "torchvision:resnet18"},
                  {"weights": ("w.pt", 1), "data": ("flowers.zip", 1)})
    data = _zip({"flowers/train/a/1.png": b"1", "flowers/val/a/2.png": b"2"})
    state = weights({"fc.weight": torch.ones(2)})
    saved = uploads.save_uploads(art, job, {"weights": ("w.pt", state),
                                            "data": ("flowers.zip", data)})
    assert saved == {"weights": "w.pt", "data": "flowers.zip"}
    paths = uploads.materialize(art, job, spec, tmp_path / "files")
    assert _stored(tmp_path / "files") == ["data/flowers/train/a/1.png",
                                           "data/flowers/val/a/2.png", "weights/w.pt"]
    assert paths["weights"] == tmp_path / "files" / "weights" / "w.pt"
    uploads.discard(art, job)
    assert _stored(tmp_path / "art") == []
    uploads.save_uploads(art, job, {"weights": ("w.pt", weights({"epoch": 3}))})
    with pytest.raises(JobSpecError, match=r"uploaded weights 'w\.pt' is not a checkpoint") as bad:
        uploads.materialize(art, job, {"uploads": {"weights": "w.pt"}}, tmp_path / "bad")
    assert bad.value.field == "weights" and str(tmp_path) not in str(bad.value)


def test_s3_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with moto.mock_aws():
        import boto3

        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="ml-artifacts")
        location, job = "s3://ml-artifacts/service", "d" * 12
        spec = _check({}, {"data": ("r.csv", 1)})
        uploads.save_uploads(location, job, {"data": ("r.csv", io.BytesIO(b"text,label\n"))})
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ml-artifacts")["Contents"]]
        assert keys == [f"service/service-uploads/{job}/data"]
        uploads.materialize(location, job, spec, tmp_path)
        assert (tmp_path / "data" / "r.csv").read_bytes() == b"text,label\n"
        uploads.discard(location, job)
        assert s3.list_objects_v2(Bucket="ml-artifacts").get("KeyCount") == 0


def test_importing_the_service_modules_does_not_import_torch() -> None:
    code = ("import sys; import autocompress.service.store, autocompress.service.jobspec, "
            "autocompress.service.uploads, autocompress.service.cli_admin; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


@pytest.mark.parametrize(("body", "field"), [
    ({"trials": 10_001}, "trials"), ({"finetune_steps": 100_001}, "finetune_steps"),
    ({"latency_repeats": 10_001}, "latency_repeats"), ({"input_size": 4097}, "input_size"),
    ({"batch_size": 4097}, "batch_size"), ({"train_threads": 257}, "train_threads"),
    ({"threads": 257}, "threads"), ({"num_classes": 100_001}, "num_classes"),
    ({"time_limit": 10_081}, "time_limit"), ({"time_limit": float("inf")}, "time_limit"),
    ({"learning_rate": float("nan")}, "learning_rate"), ({"budget": float("inf")}, "budget"),
])
def test_service_maxima_and_non_finite_numbers_are_refused(body: dict[str, Any],
                                                            field: str) -> None:
    with pytest.raises(JobSpecError, match=field) as info:
        _check(body)
    assert info.value.field == field and "\n" not in str(info.value)
    assert _check({"trials": 10_000, "time_limit": 10_080})["trials"] == 10_000


def _truncated_tar_gz() -> io.BytesIO:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as archive:
        for i in range(20):
            data = bytes(range(256)) * 40 * (i + 1)
            info = tarfile.TarInfo(f"train/a/{i}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return io.BytesIO(raw.getvalue()[: len(raw.getvalue()) // 2])


def test_truncated_archive_is_a_refusal_at_submit_and_at_extraction(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match="not a readable tar") as info:
        uploads.save_uploads(str(tmp_path / "art"), "d" * 12,
                             {"data": ("d.tar.gz", _truncated_tar_gz())})
    assert info.value.field == "data" and "\n" not in str(info.value)
    broken = tmp_path / "d.tar.gz"
    broken.write_bytes(_truncated_tar_gz().getvalue())
    with pytest.raises(JobSpecError) as extracted:
        uploads._extract(broken, "d.tar.gz", tmp_path / "out", 10**9)
    assert extracted.value.field == "data"


def test_two_turns_of_a_job_get_the_same_upload_paths(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    art, job = str(tmp_path / "art"), "e" * 12
    spec = _check({"data_options": "text=text"}, {"data": ("r.csv", 1)})
    uploads.save_uploads(art, job, {"data": ("r.csv", io.BytesIO(b"text,label\na,1\n"))})

    def turn() -> str:
        files = uploads.materialize_job(art, job, spec)
        return to_config(spec, study=f"job-{job}", storage="sqlite:///s.db", artifacts=art,
                         files_dir=files, dataset_spec=lambda name: None).data

    first, second = turn(), turn()
    folder = tmp_path / "tmp" / "autocompress-jobs" / job
    assert first == second == f"text:{folder / 'data' / 'r.csv'}?text=text"
    assert (folder / "data" / "r.csv").read_bytes() == b"text,label\na,1\n"
    assert sorted(p.name for p in folder.parent.iterdir()) == [job]  # no partial left
    zipped, other = _check({}, {"data": ("f.zip", 1)}), "f" * 12
    uploads.save_uploads(art, other, {"data": ("f.zip", _zip({"f/train/a/1.png": b"1"}))})
    specs = {to_config(zipped, study="j", storage="sqlite:///s.db", artifacts=art,
                       files_dir=uploads.materialize_job(art, other, zipped),
                       dataset_spec=lambda name: None).data for _ in range(2)}
    assert specs == {f"imagefolder:{folder.parent / other / 'data' / 'f'}"}
    uploads.remove_job_files(job)
    assert not folder.exists()
