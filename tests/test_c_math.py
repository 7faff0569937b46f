"""The artifact's own expf / logf (identical on every target) against float64 numpy."""

import subprocess
from importlib import resources

import numpy as np
from conftest import require_tools

HARNESS = r"""
#include <stdio.h>
#include <stdint.h>
float tinytrain_expf(float); float tinytrain_logf(float);
int main(void) {
  float x;
  while (fread(&x, 4, 1, stdin) == 1) {
    float r[2] = {tinytrain_expf(x), tinytrain_logf(x)};
    fwrite(r, 4, 2, stdout);
  }
  return 0;
}
"""


def test_expf_and_logf_are_within_two_ulp(tmp_path):
    require_tools("gcc")
    src = resources.files("tvm_tinytrain.codegen").joinpath("runtime", "tinytrain_math.c").read_text()
    header = "float tinytrain_expf(float); float tinytrain_logf(float);\n"
    (tmp_path / "tinytrain_internal.h").write_text(header)
    (tmp_path / "m.c").write_text(src)
    (tmp_path / "h.c").write_text(HARNESS)
    subprocess.run(["gcc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
                    "-I", str(tmp_path),
                    str(tmp_path / "m.c"), str(tmp_path / "h.c"), "-o", str(tmp_path / "h")], check=True)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-87, 88, 20000), rng.uniform(-1, 1, 20000), [0.0, 1.0, -1e-3]])
    x = x.astype(np.float32)
    out = subprocess.run([str(tmp_path / "h")], input=x.tobytes(), capture_output=True, check=True).stdout
    got = np.frombuffer(out, np.float32).reshape(-1, 2).astype(np.float64)
    exact_exp = np.exp(x.astype(np.float64))
    ulp = np.spacing(exact_exp.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got[:, 0] - exact_exp) / ulp) <= 2.0
    pos = x > 0
    exact_log = np.log(x[pos].astype(np.float64))
    ulp = np.spacing(np.abs(exact_log).astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got[pos, 1] - exact_log) / ulp) <= 2.0
    assert np.isnan(got[x < 0, 1]).all()
