/*
 * entry.S - __fentry__, the function every instrumented function calls first.
 *
 * gcc -pg -mfentry puts a call to __fentry__ at each function's entry, before the
 * prologue (after endbr64 under -fcf-protection).  The call's return address is the
 * address just after the call instruction: "site_end", unique per function whatever
 * the call's form (e8, 67 e8, ff 15 - see fentry.h), so it is the lookup key.
 *
 * On entry:   (%rsp) = site_end (return into the function's body)
 *            8(%rsp) = the function's own return address (its caller)
 * Redirecting a call means replacing (%rsp) with the replacement's address: our `ret`
 * then enters the replacement with the stack and every argument register exactly as
 * the caller left them, and the replacement returns straight to the caller.
 *
 * The patch table (table.c) is an open-addressing hash table of 16-byte slots
 * {site_end, target}; a key of 0 marks an empty slot; the hash is table_layout.h's.
 * Readers take no lock: they check the table's sequence number before and after the
 * lookup and start again when it changed (the writer rewrites only tables that are no
 * longer published; a reader that loaded such a table before the switch is the only one
 * who can see the change).  The partner of these loads is the writer's store order in
 * fentry_table_publish().
 *
 * Three paths, cheapest first:
 *   no table        nothing patched: one compare, ret (touches only flags)
 *   quick miss      the key's home slot is empty: not patched (the usual answer while
 *                   patches are active: the load factor is at most one half); one
 *                   scratch register (rax) besides r11
 *   full lookup     a hit, a collision, or a table being rewritten: three scratch
 *                   registers, linear probing, retried on any change
 * Only rax, rcx, rdx (saved and restored) and r11 (free at a call: not an argument
 * register, clobbered by the call itself) and flags (dead at a function's entry) change.
 * No call is made from here, so stack alignment does not matter.
 */

#include "table_layout.h"

	.text
	.globl	__fentry__
	.type	__fentry__, @function
	.p2align 4
__fentry__:
	.cfi_startproc
#if defined(__CET__) && (__CET__ & 1)
	endbr64				/* a target of `call *GOT(%rip)` under IBT */
#endif
	/* No table: nothing is patched.  Only r11 and flags change; no argument register
	 * (rdi rsi rdx rcx r8 r9, rax for varargs, r10 for the static chain, xmm0-7). */
	/* Partner: the release stores of fentry_active_table in fentry_table_publish(); a
	 * plain x86-64 load is an acquire, so the table's slots are read as published. */
	movq	fentry_active_table(%rip), %r11
	testq	%r11, %r11
	jnz	.Lactive
	ret

.Lactive:
	/*
	 * Quick miss, with rax as the one scratch register.  __fentry__ calls nothing, so
	 * the 128 bytes below its stack pointer are its own (the ABI's red zone: signal
	 * frames skip them): rax is kept at -8(%rsp), the seq seen at -16(%rsp).
	 */
	movq	%rax, -8(%rsp)
	.cfi_rel_offset rax, -8
	movq	TABLE_SEQ(%r11), %rax		/* partner: the seq stores of fentry_table_publish() */
	movq	%rax, -16(%rsp)
	testb	$1, %al
	jnz	.Lquick_out			/* odd: being rewritten */
	movabsq	$TABLE_HASH_MUL, %rax
	imulq	(%rsp), %rax			/* the key: site_end */
	shrq	$TABLE_HASH_SHIFT, %rax
	andq	TABLE_MASK(%r11), %rax		/* rax = the home slot's offset */
	cmpq	$0, TABLE_SLOTS+SLOT_KEY(%r11,%rax)
	jne	.Lquick_out			/* occupied: a hit or a collision */
	movq	-16(%rsp), %rax
	/* Loads are not reordered with loads (x86-64): this seq is read after the slot. */
	cmpq	TABLE_SEQ(%r11), %rax		/* the empty slot was read from a stable table */
	jne	.Lquick_out
	movq	-8(%rsp), %rax
	.cfi_restore rax
	ret

.Lquick_out:
	.cfi_rel_offset rax, -8
	movq	-8(%rsp), %rax
	.cfi_restore rax

	/* Full lookup: three scratch registers, saved; stack: rdx rcx rax site_end. */
	pushq	%rax
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset rax, 0
	pushq	%rcx
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset rcx, 0
	pushq	%rdx
	.cfi_adjust_cfa_offset 8
	.cfi_rel_offset rdx, 0

.Lretry:
	movq	fentry_active_table(%rip), %r11	/* the table published now (same partner) */
	testq	%r11, %r11
	jz	.Ldone				/* everything was reverted meanwhile */
	movq	TABLE_SEQ(%r11), %rcx		/* rcx = seq seen before the lookup */
	testb	$1, %cl
	jnz	.Lretry				/* odd: being rewritten, read again */
	movabsq	$TABLE_HASH_MUL, %rdx
	imulq	24(%rsp), %rdx			/* the key: site_end */
	shrq	$TABLE_HASH_SHIFT, %rdx
	andq	TABLE_MASK(%r11), %rdx		/* rdx = the home slot's offset */
	movq	24(%rsp), %rax			/* rax = the key */

.Lprobe:
	cmpq	TABLE_SLOTS+SLOT_KEY(%r11,%rdx), %rax
	je	.Lhit
	cmpq	$0, TABLE_SLOTS+SLOT_KEY(%r11,%rdx)
	je	.Lmiss
	cmpq	TABLE_SEQ(%r11), %rcx		/* a stale table being rewritten can cycle: */
	jne	.Lretry				/* leave as soon as its seq moves           */
	addq	$SLOT_SIZE, %rdx		/* linear probing, wrapping at the end */
	andq	TABLE_MASK(%r11), %rdx
	jmp	.Lprobe

.Lhit:
	movq	TABLE_SLOTS+SLOT_TARGET(%r11,%rdx), %rdx
	cmpq	TABLE_SEQ(%r11), %rcx		/* the slot was read from a stable table? */
	jne	.Lretry
	movq	%rdx, 24(%rsp)			/* `ret` now enters the replacement */
	jmp	.Ldone

.Lmiss:
	cmpq	TABLE_SEQ(%r11), %rcx
	jne	.Lretry

.Ldone:
	popq	%rdx
	.cfi_adjust_cfa_offset -8
	.cfi_restore rdx
	popq	%rcx
	.cfi_adjust_cfa_offset -8
	.cfi_restore rcx
	popq	%rax
	.cfi_adjust_cfa_offset -8
	.cfi_restore rax
	ret
	.cfi_endproc
	.size	__fentry__, .-__fentry__

	/*
	 * The probe site: never called, it holds one call of __fentry__ as every instrumented
	 * function's entry does (e8 <rel32>: direct, __fentry__ is defined here).  A build that
	 * prepares the sites (fentry_build/build/prepare.py) changes it with all the others,
	 * so the shim reads here, at start, whether it has anything to write (sites.c).
	 */
	.text
	.p2align 4
	.type	fentry_probe_site, @function
fentry_probe_site:
	call	__fentry__
	ret
	.size	fentry_probe_site, .-fentry_probe_site
	.hidden	fentry_probe_site
	.globl	fentry_probe_site

	/*
	 * The site list for jump mode.  -mrecord-mcount makes gcc list the address of every
	 * fentry call in a read-only section __mcount_loc; in a PIE those addresses need
	 * run-time relocations, so a read-only section would mean DT_TEXTREL (a warning,
	 * and a link failure under -z text).  The linker gives an output section the union
	 * of its inputs' flags: this empty writable contribution makes the whole section
	 * writable, so it is relocated like ordinary data.  __start___mcount_loc and
	 * __stop___mcount_loc (made by the linker) bound it; sites.c reads it.
	 */
	.section __mcount_loc, "aw"
	.previous

	.section .note.GNU-stack, "", @progbits
