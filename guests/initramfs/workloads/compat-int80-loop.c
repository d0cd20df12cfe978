/*
 * compat-int80-loop <cpu>: a 32-bit task that calls getpid() forever through
 * int $0x80, the legacy 32-bit system call gate.  On a 64-bit kernel it
 * enters at asm_int80_emulation (an IDT entry that goes through error_entry
 * from user mode) and returns with IRET through
 * swapgs_restore_regs_and_return_to_usermode; it works on every x86-64 CPU.
 */
static const char cr3rig_name[] = "compat-int80-loop";

/* Runs on any vendor: the task dies with SIGILL where the gate is #UD. */
static const char cr3rig_refused_vendor[] = "";
static const char cr3rig_refused_hint[] =
	"";

#include "compat32.h"

static long cr3rig_loop_syscall(long nr)
{
	return int80_3(nr, 0, 0, 0);
}
