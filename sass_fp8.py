import sys, hashlib, re
sys.path.insert(0, "benchmarks")
import jax.numpy as jnp, compile_report
from flashmla_jax.kernels import _compile
for shape, kw in [((128,1,128,4096), {}), ((64,1,16,4096), dict(paged=True))]:
    c, _ = compile_report.compile_gluon_kernel(shape, jnp.bfloat16, kv_format="fp8_blockscale", **kw)
    f = _compile.facts(c)
    body = re.sub(r'/\*[0-9a-f]+\*/', '', f.sass)
    print(shape, kw, f.stack, f.shared, len(body.split('\n')), hashlib.md5(body.encode()).hexdigest()[:10])
