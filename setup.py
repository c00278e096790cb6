"""Build the optional fused CPU kernels (``neuromerge.kernels._fused``); everything else is in pyproject.toml.

The extension is ``optional``: without a C compiler the install still succeeds and the engine uses its torch path
(``neuromerge.kernels.available()`` says which). No FMA contraction, so the kernels round like the torch path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "neuromerge.kernels._fused",
            sources=["src/neuromerge/kernels/_fused.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-std=c11",
                                "-Wno-psabi"],
            optional=True,
        )
    ]
)
