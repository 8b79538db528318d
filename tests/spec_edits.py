"""Edits of an executable spec for the validation tests (test_executable.py, test_spec_ops.py):
each returns edit(spec, arrays=None) that changes the spec in place."""


def _parent(spec, path):
    obj = spec
    for key in path[:-1]:
        obj = obj[key]
    return obj


def set_field(path, value):
    """spec[path...] = value."""
    def edit(spec, arrays=None):
        _parent(spec, path)[path[-1]] = value
    return edit


def drop_field(path):
    """del spec[path...]."""
    def edit(spec, arrays=None):
        del _parent(spec, path)[path[-1]]
    return edit
