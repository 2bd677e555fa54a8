"""Build the Cython kernels (qcow2fast/_ext/*.pyx)."""
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

EXT_DIR = os.path.join("qcow2fast", "_ext")
MODULES = ["spec", "kernels", "fileio", "cache", "allocator", "state", "hooks", "core", "reqloop",
           "resolved", "chain", "batch", "hookfile", "sectorcipher", "nbdio"]

extensions = [
    Extension(
        f"qcow2fast._ext.{name}",
        [os.path.join(EXT_DIR, f"{name}.pyx")],
        include_dirs=[numpy.get_include(), "csrc"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
                       ("_GNU_SOURCE", "1")],
        extra_compile_args=["-O3"],
    )
    for name in MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
