"""The Problem seam: every problem class has what a run asks of it, and --teacher PATH is dispatched in one place
(``emd_fast.problems.TEACHER_PROBLEMS``). A new teacher format listed there is checked here without a new test."""
import inspect

import pytest

from emd_fast import problems
from emd_fast.problems import TEACHER_PROBLEMS, Problem, check_foreign_options, problem_class
from emd_fast.problems.digits import DigitsProblem
from emd_fast.problems.mixture import MixtureProblem

MEMBERS = {name for name in vars(Problem) if not name.startswith("_")} | set(Problem.__annotations__)
TEACHER_CLASSES = [problems._load(spec) for spec in TEACHER_PROBLEMS]


@pytest.mark.parametrize("cls", [*TEACHER_CLASSES, DigitsProblem, MixtureProblem], ids=lambda c: c.__name__)
def test_every_problem_class_has_the_protocols_members(cls):
    built = {"teacher", "sigma_data", "num_classes"}  # what from_config gives an instance
    missing = {m for m in MEMBERS - built if not hasattr(cls, m)}
    assert not missing, f"{cls.__name__} lacks {sorted(missing)}"
    assert isinstance(cls.options, frozenset)
    for name in ("check_options", "input_files", "from_config"):
        assert isinstance(inspect.getattr_static(cls, name), classmethod), name


@pytest.mark.parametrize("cls", TEACHER_CLASSES, ids=lambda c: c.__name__)
def test_teacher_formats_say_what_they_read(cls):
    assert callable(cls.claims) and isinstance(cls.reads, str) and "--teacher" in cls.reads


def test_teacher_paths_go_to_their_format_and_the_rest_is_named(tmp_path):
    (tmp_path / "t.pkl").write_bytes(b"")
    assert problem_class({"teacher": tmp_path / "t.pkl"}).__name__ == "ImageProblem"
    assert problem_class({"teacher": tmp_path}).__name__ == "DiffusersProblem"
    assert problem_class({"preset": "digits"}) is DigitsProblem
    assert problem_class({"preset": "ring2d"}) is MixtureProblem
    with pytest.raises(ValueError) as e:
        problem_class({"teacher": tmp_path / "missing"})
    assert all(cls.reads in str(e.value) for cls in TEACHER_CLASSES)


def test_an_option_of_another_format_names_the_format_that_takes_it():
    check_foreign_options({"prompts": None, "grad_checkpoint": False}, MixtureProblem)
    taker = next(cls for cls in TEACHER_CLASSES if "prompts" in cls.options)
    check_foreign_options({"prompts": "p.txt"}, taker)
    with pytest.raises(ValueError, match=r"^--prompts applies to diffusers teachers \(--teacher DIR"):
        check_foreign_options({"prompts": "p.txt"}, MixtureProblem)
    with pytest.raises(ValueError, match="^--grad-checkpoint applies to"):
        check_foreign_options({"grad_checkpoint": True}, DigitsProblem)
