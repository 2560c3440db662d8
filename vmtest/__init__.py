"""make vmtest: a pure cgroup v2 host under systemd, booted in qemu (docs/vmtest.md)."""
