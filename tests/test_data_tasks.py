"""Task registry and the build_dataset factory: channels, task lists, errors listing the valid choices."""
import pytest

from mtlfast.data import TASKS, build_dataset, canonical_dataset, check_tasks, dataset_tasks, num_outputs


def test_output_channels():
    assert [num_outputs("semseg", d) for d in ("nyud", "pascal", "synthetic")] == [40, 21, 6]
    assert {t: num_outputs(t, "synthetic") for t in TASKS} == {
        "semseg": 6, "depth": 1, "normals": 3, "edge": 1, "parts": 7, "sal": 1}
    assert num_outputs("parts", "PASCALContext") == 7


def test_dataset_tasks_and_aliases():
    assert dataset_tasks("nyud") == ("semseg", "depth", "normals", "edge")
    assert dataset_tasks("pascal") == ("semseg", "parts", "sal", "normals", "edge")
    assert set(dataset_tasks("synthetic")) == set(TASKS)
    assert canonical_dataset("NYUDv2") == "nyud" and canonical_dataset("pascal-context") == "pascal"
    assert check_tasks("depth", "nyud") == ("depth",)


def test_errors_list_valid_choices():
    with pytest.raises(ValueError, match="valid choices: nyud, pascal, synthetic"):
        canonical_dataset("cityscapes")
    with pytest.raises(ValueError, match="nyud has no 'parts' labels; it has semseg, depth, normals, edge"):
        check_tasks(["semseg", "parts"], "nyud")
    with pytest.raises(ValueError, match="unknown task 'segm'; valid tasks: semseg, depth"):
        check_tasks(["segm"], "synthetic")
    with pytest.raises(ValueError, match="duplicate"):
        check_tasks(["depth", "depth"], "synthetic")
    with pytest.raises(ValueError, match="at least one task"):
        check_tasks([], "synthetic")
    with pytest.raises(ValueError, match="dataset: unknown dataset 'kitti'; valid choices"):
        build_dataset("kitti")
    with pytest.raises(ValueError, match="unknown split 'tset'"):
        build_dataset("synthetic", split="tset")
    with pytest.raises(TypeError, match="unexpected arguments for nyud: length"):
        build_dataset("nyud", length=3)
    with pytest.raises(FileNotFoundError, match="NYUDv2"):
        build_dataset("nyud", root="/nonexistent/data")
