"""client/ - talking to running processes: /proc, the control socket, attach through gdb."""
