"""The digits distillation students; they live in the zoo (`jaxshrink.models.student`)."""

from jaxshrink.models.student import DigitsStudent as DigitsStudent
from jaxshrink.models.student import DigitsStudentNNX as DigitsStudentNNX
from jaxshrink.models.student import digits_student as digits_student
from jaxshrink.models.student import digits_student_nnx as digits_student_nnx
