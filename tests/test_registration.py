"""PEFT registration of the registry's methods, in fresh processes: whatever is imported first, and how.

``import neuroada_plugin`` imports no PEFT; the methods become PEFT methods the moment ``peft`` is
imported (start-up hook, armed by the ``.pth`` file or by the explicit import even when
``NEUROADA_PLUGIN_NO_AUTOLOAD=1``), or right away when ``peft`` is already there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


_REGISTERED = "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING as T; print('NEUROADA' in T)"


def test_import_order_and_the_autoload_switch():
    # The switch turns the start-up hook off: peft alone knows nothing of NEUROADA...
    assert _run(f"import peft; {_REGISTERED}", NEUROADA_PLUGIN_NO_AUTOLOAD="1").split() == ["False"]
    # ...but an explicit import still registers, before or after peft, and imports no PEFT itself.
    out = _run(
        f"""
        import sys
        import neuroada_plugin
        print('peft' in sys.modules, 'transformers' in sys.modules)
        import peft
        {_REGISTERED}
        """,
        NEUROADA_PLUGIN_NO_AUTOLOAD="1",
    )
    assert out.split() == ["False", "False", "True"]
    assert _run(f"import peft, neuroada_plugin; {_REGISTERED}", NEUROADA_PLUGIN_NO_AUTOLOAD="1").split() == ["True"]


def test_a_method_module_imported_first_registers_once_it_is_complete():
    """``import neuroada_plugin.neuroada.layer`` as the process's first PEFT import: the hook fires while the layer
    module is half-imported; registration is skipped then, not broken, and completes on the next call."""
    out = _run(
        f"""
        import neuroada_plugin.neuroada.layer
        from neuroada_plugin.peft_registration import ensure_registered, register_all, registered_methods
        import peft
        assert ensure_registered("neuroada") is peft.PeftType.NEUROADA
        {_REGISTERED}
        assert "neuroada" in register_all() and list(peft.PeftType).count(peft.PeftType.NEUROADA) == 1
        from neuroada_plugin import NeuroAdaConfig, NeuroAdaModel
        assert registered_methods()["neuroada"] == (NeuroAdaConfig, NeuroAdaModel)
        """
    )
    assert out.split() == ["True"]


def test_lazy_names_and_python_dash_m():
    out = _run(
        """
        import sys
        import neuroada_plugin
        from neuroada_plugin.neuroada import select_connections
        print('peft' in sys.modules)
        from neuroada_plugin import NeuroAdaConfig, NeuroAdaLayer, NeuroAdaModel, __version__
        from neuroada_plugin.neuroada import Linear
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        print(PEFT_TYPE_TO_CONFIG_MAPPING["NEUROADA"] is NeuroAdaConfig, issubclass(Linear, NeuroAdaLayer))
        print(sorted(set(neuroada_plugin.__all__) - set(dir(neuroada_plugin))))
        """
    )
    assert out.split() == ["False", "True", "True", "[]"]
    listed = subprocess.run(
        [sys.executable, "-m", "neuroada_plugin", "methods"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert listed.returncode == 0 and listed.stdout.splitlines()[1].startswith("neuroada "), listed.stderr
