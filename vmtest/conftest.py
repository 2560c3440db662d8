"""vmtest/guest/ runs only inside the VM (remedy-vmtest.service sets REMEDY_VMTEST_GUEST=1):
on the host, ``pytest vmtest`` collects only the host side, vmtest/test_vm.py."""

from __future__ import annotations

import os

collect_ignore = [] if os.environ.get("REMEDY_VMTEST_GUEST") == "1" else ["guest"]
