import hashlib
import json
import struct

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from selbench.cli import main
from selbench.export import (
    ExportError,
    datacomp_uid_array,
    read_datacomp_npy,
    write_datacomp_npy,
)


def datacomp_uids(n: int, salt: str = "") -> list[str]:
    """uids shaped like CommonPool's: 32 lower-case hex digits (md5-sized hashes)."""
    return [hashlib.md5(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def test_datacomp_round_trip_gives_the_same_uids_sorted(tmp_path):
    uids = datacomp_uids(50)
    path = write_datacomp_npy(uids, tmp_path / "subset.npy")
    back = read_datacomp_npy(path)
    assert back == sorted(uids)  # fixed-width lower-case hex: string order = numeric order
    array = np.load(path)
    assert array.dtype == np.dtype("u8,u8") and array.shape == (50,)


def test_datacomp_file_matches_the_documented_byte_layout(tmp_path):
    """DataComp README: np.save of a u8,u8 structured array, (int(uid[:16],16),
    int(uid[16:32],16)) per uid, sorted; resharder.py asserts dtype == np.dtype('u8,u8')."""
    uids = ["6e356964a967af455c8016b75d691203", "139e4a9b22a614771f06c700a8ebe150"]
    path = write_datacomp_npy(uids, tmp_path / "subset.npy")
    raw = path.read_bytes()
    assert raw[:8] == b"\x93NUMPY\x01\x00"  # npy format version 1.0
    (header_len,) = struct.unpack("<H", raw[8:10])
    header = eval(raw[10 : 10 + header_len].decode("latin1"))  # a Python dict literal
    assert header == {
        "descr": [("f0", "<u8"), ("f1", "<u8")],
        "fortran_order": False,
        "shape": (2,),
    }
    assert (10 + header_len) % 64 == 0  # npy pads the header to 64 bytes
    body = raw[10 + header_len :]
    expected = b"".join(struct.pack("<QQ", int(u[:16], 16), int(u[16:], 16)) for u in sorted(uids))
    assert body == expected


def test_datacomp_lookup_finds_every_selected_uid_as_the_resharder_does(tmp_path):
    """resharder.py: divmod(int(json_uid, 16), 2**64) then np.searchsorted in the file."""
    selected = datacomp_uids(20)
    others = datacomp_uids(20, salt="not-selected")
    subset = np.load(write_datacomp_npy(selected, tmp_path / "s.npy"), mmap_mode="r")
    for uid in selected + others:
        key = np.array([divmod(int(uid, 16), 2**64)], np.dtype("u8,u8"))[0]
        count = np.searchsorted(subset, key, "right") - np.searchsorted(subset, key, "left")
        assert count == (1 if uid in selected else 0)


def test_upper_case_hex_is_the_same_uid():
    uid = datacomp_uids(1)[0]
    assert datacomp_uid_array([uid.upper()]).tolist() == datacomp_uid_array([uid]).tolist()


@pytest.mark.parametrize("bad", ["000010002", "g" * 32, "0" * 33, ""])
def test_non_datacomp_uids_are_refused_naming_the_uid(bad, tmp_path):
    with pytest.raises(ExportError, match=f"uid {bad!r} is not a DataComp uid.*--format parquet"):
        write_datacomp_npy(datacomp_uids(3) + [bad], tmp_path / "s.npy")
    assert not (tmp_path / "s.npy").exists()


def test_a_uid_twice_is_refused():
    uid = datacomp_uids(1)[0]
    with pytest.raises(ExportError, match=f"uid {uid} appears twice"):
        datacomp_uid_array([uid, uid.upper()])


def test_reading_a_file_of_another_dtype_is_a_clear_error(tmp_path):
    np.save(tmp_path / "wrong.npy", np.arange(4, dtype=np.uint64))
    with pytest.raises(ExportError, match="not DataComp's"):
        read_datacomp_npy(tmp_path / "wrong.npy")


def _logged_run(selection: pd.DataFrame, tmp_path, params: dict | None = None) -> str:
    import mlflow

    from selbench import tracking

    experiment = tracking.setup("export-test")
    path = tmp_path / "selection.parquet"
    selection.to_parquet(path, index=False)
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifact(str(path))
        mlflow.log_params(params or {})
    return run.info.run_id


def test_export_command_writes_both_formats_from_the_runs_artifact(tmp_path):
    uids = datacomp_uids(8)
    selection = pd.DataFrame(
        {
            "uid": uids,
            "caption": [f"caption {i}" for i in range(8)],
            "train_caption": [f"rewritten {i}" for i in range(8)],
            "score": np.linspace(0, 1, 8),
        }
    )
    run_id = _logged_run(selection, tmp_path)
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(main, ["export", run_id, "--format", "datacomp", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert read_datacomp_npy(out / f"{run_id}.npy") == sorted(uids)
    result = runner.invoke(main, ["export", run_id, "--format", "parquet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(pd.read_parquet(out / f"{run_id}.parquet"), selection)


def test_export_of_a_synthweb_style_run_as_datacomp_says_what_to_do(tmp_path):
    selection = pd.DataFrame(
        {"uid": ["000000001"], "caption": ["a"], "train_caption": ["a"], "score": [np.nan]}
    )
    run_id = _logged_run(selection, tmp_path)
    result = CliRunner().invoke(
        main, ["export", run_id, "--format", "datacomp", "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "'000000001' is not a DataComp uid" in result.output
    assert "--format parquet" in result.output


def test_export_of_an_unknown_run_names_it(tmp_path):
    result = CliRunner().invoke(main, ["export", "0123456789abcdef", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "no MLflow run '0123456789abcdef'" in result.output


def test_shards_export_writes_the_selected_samples_with_training_captions(shard_pool_dir, tmp_path):
    from selbench.pools import ShardPool

    pool = ShardPool(shard_pool_dir)
    spec = tmp_path / "pool.yaml"
    spec.write_text(
        f"name: fixture\nkind: shards\npath: {shard_pool_dir}\n"
        f"eval: [{{name: x, task: retrieval, path: {tmp_path}/nowhere}}]\n"
    )
    chosen = pool.uids[::2]
    selection = pd.DataFrame(
        {
            "uid": chosen,
            "caption": [dict(zip(pool.uids, pool.captions, strict=True))[u] for u in chosen],
            "train_caption": [f"rewritten {u}" for u in chosen],
            "score": [0.5] * len(chosen),
        }
    )
    params = {"pool_spec": str(spec), "pool_fingerprint": pool.fingerprint}
    run_id = _logged_run(selection, tmp_path, params)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", run_id, "--format", "shards", "--out", str(out)])
    assert result.exit_code == 0, result.output
    exported = ShardPool(out / run_id)
    assert [json.loads(m)["uid"] for m in _jsons(out / run_id)] == chosen
    assert exported.captions == [f"rewritten {u}" for u in chosen]

    stale = _logged_run(selection, tmp_path, {**params, "pool_fingerprint": "0" * 16})
    result = CliRunner().invoke(main, ["export", stale, "--format", "shards", "--out", str(out)])
    assert result.exit_code == 1 and "changed since run" in result.output


def _jsons(root):
    import tarfile

    for shard in sorted(root.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    yield tar.extractfile(member).read()
