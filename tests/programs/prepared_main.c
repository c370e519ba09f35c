/*
 * prepared_main.c - main() of the programs of tests/test_prepared.py: NFUNCS generated
 * functions f_<i>(x) = x + i (the test writes them, 100 to a file, and the table fns[]).
 *
 * Prints "ready", then answers lines on stdin:
 *   c I      prints f_I(7) (7 + I; a patch of tests/test_prepared.py makes it 7 + I + 1000)
 *   a        calls every function once; prints how many returned the original / patched value
 *   q        exits 0
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern long (*const fns[])(long);
extern const long nfns;

int main(void)
{
	char line[64];

	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready\n");
	while (fgets(line, sizeof(line), stdin)) {
		if (line[0] == 'c') {
			long i = atol(line + 2);

			printf("%ld\n", i >= 0 && i < nfns ? fns[i](7) : -1L);
		} else if (line[0] == 'a') {
			long orig = 0, patched = 0;

			for (long i = 0; i < nfns; i++) {
				long r = fns[i](7);

				orig += r == 7 + i;
				patched += r == 7 + i + 1000;
			}
			printf("original=%ld patched=%ld\n", orig, patched);
		} else if (line[0] == 'q') {
			return 0;
		}
	}
	return 0;
}
