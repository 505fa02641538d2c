"""What each msrun worker runs for tests/multiproc.run_on_ranks: file.py function out_dir kwargs-json."""
import importlib.util
import json
import pickle
import sys
import traceback
from pathlib import Path


def main() -> int:
    path, function, out_dir, kwargs = sys.argv[1], sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
    from mindtron.parallel_core import comm
    from mindtron.parallel_core.runtime import init_runtime

    init_runtime("CPU")
    rank = comm.get_rank()
    try:
        spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        result = getattr(module, function)(**kwargs)
    except Exception:
        (out_dir / f"rank_{rank}.error").write_text(traceback.format_exc())
        traceback.print_exc()
        return 1
    (out_dir / f"rank_{rank}.pkl").write_bytes(pickle.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
