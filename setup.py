"""Build script: one distribution, two packages, one Cython extension.

Nothing here imports torch or fairseq; the build needs only setuptools, Cython and numpy
(declared in pyproject.toml).
"""
import re
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "graphormer_ext" / "__init__.py").read_text(), re.M
).group(1)

extensions = [
    Extension(
        "graphormer_ext.algos",
        ["graphormer_ext/algos.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "graphormer_ext._algos_legacy",
        ["graphormer_ext/_algos_legacy.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ),
]

setup(
    name="transformer-m",
    version=VERSION,
    description="Transformer-M, GeoMFormer and 3D-GSRD as a fairseq plugin, with a "
    "Graphormer-lineage molecular data layer",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["graphormer_ext", "graphormer_ext.*", "transformer_m", "transformer_m.*"]),
    package_data={"graphormer_ext": ["*.pyx"]},
    ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}),
    python_requires=">=3.10",
    install_requires=["numpy>=1.24", "torch>=2.1", "lmdb>=1.4", "tqdm>=4.60"],
    extras_require={
        "fairseq": ["fairseq-fixed==0.12.3.1", "bitarray==2.9.3"],
        "featurize": ["rdkit>=2023.9", "ogb>=1.3.6", "pandas>=2.0"],
        "plot": ["matplotlib>=3.7"],
        "test": ["pytest>=7", "scipy>=1.10"],
        "qm9": ["qm9pack==1.0.3"],
    },
    entry_points={
        "console_scripts": [
            "graphormer-ext-preprocess=graphormer_ext.preprocess:main",
            "transformer-m-train=transformer_m.cli:train",
            "transformer-m-validate=transformer_m.cli:validate",
            "transformer-m-predict=transformer_m.predict:main",
        ]
    },
    zip_safe=False,
)
