/*
 * tiny.h - the functions the micro benchmark calls, and what their replacements compute.
 *
 * tiny() is the function called 10^8 times; other() exists so that a patch can make the
 * dispatch table active without covering tiny() (the "active-table miss" variant).
 * The bodies are macros so that the patches and the direct-call build run the very same
 * code as the replacement.
 */
#ifndef BENCH_TINY_H
#define BENCH_TINY_H

#define TINY_BODY(x) ((x) * 3 + 1)       /* tiny(), as built                       */
#define TINY_REPL_BODY(x) ((x) * 3 + 2)  /* tiny_patch.c's replacement, direct.c    */
#define OTHER_BODY(x) ((x) - 1)          /* other(), as built                       */
#define OTHER_REPL_BODY(x) ((x) + 100)   /* other_patch.c's replacement             */

long tiny(long x);
long other(long x);
long tiny_direct(long x);

#endif /* BENCH_TINY_H */
