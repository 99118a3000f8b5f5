"""The one compiled part of tvorch: the IMA judgement's per-entry loop (tvorch/core/attestation/_ima_fold.c).

Everything else is declared in pyproject.toml. It links OpenSSL's libcrypto
(Debian: libssl-dev to build, libssl3 to run).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "tvorch.core.attestation._ima_fold",
    sources=["tvorch/core/attestation/_ima_fold.c"],
    libraries=["crypto"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)])
