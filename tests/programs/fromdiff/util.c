/* util.c - word classes for calc.c (tests/test_fromdiff.py). */
#include <ctype.h>
#include <string.h>

#include "calc.h"

/* 1 for a word of letters, 2 for a number, 0 otherwise; plus 10 times the words seen. */
int word_class(const char *word)
{
	static int seen;
	size_t n = strlen(word);
	int letters = 0, digits = 0;

	seen++;
	for (size_t i = 0; i < n && i < WORD_MAX; i++) {
		letters += isalpha((unsigned char)word[i]) != 0;
		digits += isdigit((unsigned char)word[i]) != 0;
	}
	if (letters == (int)n)
		return 1 + 10 * seen;
	return (digits == (int)n ? 2 : 0) + 10 * seen;
}
