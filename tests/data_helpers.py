"""Pieces shared by the tests of the dataset readers (test_data_nyud.py, test_data_pascal.py)."""


def identity(sample):
    """Transform that keeps the raw sample: labels as decoded, no normalisation or padding."""
    return sample


def snapshot(folder):
    """Path, size and modification time of everything under ``folder``: equal before and after = nothing written."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))
