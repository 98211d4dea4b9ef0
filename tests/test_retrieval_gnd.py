"""Safe ground-truth loading: allowed content loads (any pickle protocol, numpy.core or numpy._core
paths), anything else is refused without running, and the content is validated."""
import os
import pickle

import numpy as np
import pytest

from sg_train.retrieval import GroundTruthError, UnsafePickleError, dataset_name, load_gnd


def roxford_like(arrays: bool):
    conv = (lambda v: np.asarray(v, dtype=np.int64)) if arrays else list
    return {
        "imlist": ["all_souls_000013", "ashmolean_000283", "radcliffe_000027", "bodleian_000132"],
        "qimlist": ["all_souls_000013_q", "radcliffe_q"],
        "gnd": [
            {"bbx": [136.5, 34.1, 648.5, 955.7], "easy": conv([1]), "hard": conv([2, 3]), "junk": conv([])},
            {"bbx": np.array([1.0, 2.0, 3.0, 4.0]), "easy": conv([]), "hard": conv([0]), "junk": conv([3])},
        ],
    }


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("arrays", [False, True])
def test_loads_plain_and_numpy_content(tmp_path, protocol, arrays):
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(roxford_like(arrays), protocol=protocol))
    gnd = load_gnd(path)
    assert gnd["imlist"][1] == "ashmolean_000283" and len(gnd["qimlist"]) == 2
    assert gnd["gnd"][0]["hard"].tolist() == [2, 3] and gnd["gnd"][0]["hard"].dtype == np.int64
    assert gnd["gnd"][0]["junk"].size == 0
    assert gnd["gnd"][1]["bbx"] == [1.0, 2.0, 3.0, 4.0]
    assert dataset_name(path) == "roxford5k"


def test_numpy_1x_module_paths_are_accepted(tmp_path):
    # pickles written by numpy 1.x name numpy.core.multiarray; numpy 2 renamed it numpy._core
    data = pickle.dumps(roxford_like(arrays=True), protocol=2)
    assert b"numpy._core.multiarray" in data
    path = tmp_path / "gnd_old.pkl"
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert load_gnd(path)["gnd"][1]["junk"].tolist() == [3]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    obj = roxford_like(arrays=False)
    obj["gnd"][0]["easy"] = _Payload(marker)
    path = tmp_path / "gnd_evil.pkl"
    path.write_bytes(pickle.dumps(obj))
    assert b"system" in path.read_bytes()
    with pytest.raises(UnsafePickleError, match=r"refusing to load global '(posix|os|nt)\.system'"):
        load_gnd(path)
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("collections", "OrderedDict"),
                                         ("numpy", "load"), ("subprocess", "Popen")])
def test_other_globals_are_refused(tmp_path, module, name):
    path = tmp_path / "gnd_x.pkl"
    # GLOBAL module name, then STOP: find_class alone must refuse
    path.write_bytes(b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n.")
    with pytest.raises(UnsafePickleError, match=f"'{module}.{name}'"):
        load_gnd(path)


@pytest.mark.parametrize("mutate,message", [
    (lambda g: g["gnd"][0].__setitem__("hard", [2, 4]), r"gnd\[0\]\['hard'\] index 4 is out of range for imlist of 4"),
    (lambda g: g["gnd"][1].__setitem__("junk", [-1]), r"gnd\[1\]\['junk'\] index -1 is out of range"),
    (lambda g: g["gnd"][1].__setitem__("easy", [1.5]), r"gnd\[1\]\['easy'\] holds 1.5, not an image index"),
    (lambda g: g["gnd"][1].__setitem__("easy", "abc"), r"gnd\[1\]\['easy'\] must be a list or array"),
    (lambda g: g["gnd"][0].__setitem__("bbx", [5, 1, 4, 9]),
     r"gnd\[0\]\['bbx'\] = \[5.0, 1.0, 4.0, 9.0\] is not a box"),
    (lambda g: g["gnd"][0].__setitem__("bbx", [1, 2, 3]), r"gnd\[0\]\['bbx'\] must be 4 numbers"),
    (lambda g: g["gnd"][0].pop("junk"), r"gnd\[0\] lacks key\(s\) \['junk'\]"),
    (lambda g: g.pop("qimlist"), r"missing key\(s\) \['qimlist'\]"),
    (lambda g: g["qimlist"].append("extra"), "'gnd' has 2 entries but 'qimlist' has 3 queries"),
    (lambda g: g.__setitem__("imlist", [1, 2]), "'imlist' must be a list of image names"),
])
def test_validation_names_the_problem(tmp_path, mutate, message):
    obj = roxford_like(arrays=False)
    mutate(obj)
    path = tmp_path / "gnd_bad.pkl"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(GroundTruthError, match=message):
        load_gnd(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_gnd(tmp_path / "missing.pkl")
    path = tmp_path / "gnd_trunc.pkl"
    path.write_bytes(pickle.dumps(roxford_like(False))[:40])
    with pytest.raises(GroundTruthError, match="not a readable ground-truth pickle"):
        load_gnd(path)
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(GroundTruthError, match="expected a dict"):
        load_gnd(path)


def test_dataset_name():
    assert dataset_name("/data/rparis6k/gnd_rparis6k.pkl") == "rparis6k"
    assert dataset_name("custom.pkl") == "custom"
