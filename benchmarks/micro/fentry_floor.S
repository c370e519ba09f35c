/*
 * fentry_floor.S - stand-ins for the shim's __fentry__ that measure the floor of dispatch
 * mode (benchmarks/run.py, micro): an instrumented program linked with one of these
 * instead of the shim calls __fentry__ at every entry exactly as in dispatch mode.
 *
 *   -DFLOOR_RET     __fentry__ is `ret`: the call and return pair alone, the least any
 *                   dispatch-mode call can cost (nothing patched)
 *   -DFLOOR_BRANCH  __fentry__ loads a pointer, tests it (non-NULL, as an active table) and
 *                   takes the branch to a second `ret`: the least a call can cost while a
 *                   table is active, before any lookup
 */
	.data
	.p2align 3
floor_table:
	.quad	floor_table		/* non-NULL: "a table is active" */

	.text
	.globl	__fentry__
	.type	__fentry__, @function
	.p2align 4
__fentry__:
#if defined(FLOOR_BRANCH)
	movq	floor_table(%rip), %r11
	testq	%r11, %r11
	jnz	1f
	ret
1:	ret
#else
	ret
#endif
	.size	__fentry__, .-__fentry__

	.section .note.GNU-stack, "", @progbits
