"""The field policy's table of refused fields is the one the README lists, and its rules accept
exactly the "off" values."""

from __future__ import annotations

import pytest
from procs import ROOT

from clusterkit.errors import APIError
from worker import field_policy


def test_readme_lists_every_refused_field():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**Field policy.**"):]
    section = section[:section.index("\n## ")]
    for table in (field_policy.CHAT, field_policy.COMPLETIONS, field_policy.EMBEDDINGS):
        for name in table:
            assert f"`{name}`" in section, name


def test_off_values_pass_and_others_are_400_naming_the_field():
    field_policy.check({"use_beam_search": False, "length_penalty": 1.0, "priority": 0, "unknown": 5},
                       field_policy.CHAT)
    for extra, param in [({"use_beam_search": True}, "use_beam_search"), ({"priority": 1}, "priority"),
                         ({"length_penalty": 1.5}, "length_penalty"), ({"echo": 1}, "echo")]:
        with pytest.raises(APIError) as e:
            field_policy.check(extra, field_policy.CHAT)
        assert e.value.status == 400 and e.value.param == param
    field_policy.check_best_of(None, 2)
    field_policy.check_best_of(2, 2)
    with pytest.raises(APIError):
        field_policy.check_best_of(3, 2)
