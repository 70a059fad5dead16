# Plain prompt for the QEMU rig (labgrid's ShellDriver matches it).
PS1='\u@\h:\w\$ '
export SYSTEMD_PAGER= SYSTEMD_COLORS=0 PAGER=cat
