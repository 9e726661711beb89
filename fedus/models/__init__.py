"""Teacher and student networks, built from timm names in `create_model` style."""

from fedus.models.student import Student, create_student
from fedus.models.teacher import Teacher, create_teacher
from fedus.models.weights import load_state, save_state

__all__ = ["Student", "Teacher", "create_student", "create_teacher", "load_state", "save_state"]
