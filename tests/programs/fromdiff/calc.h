/* calc.h - what calc.c and util.c share (tests/test_fromdiff.py). */
#ifndef CALC_H
#define CALC_H

#define WORD_MAX 16 /* longest word util.c classifies; calc.c checks it too */

int word_class(const char *word);

#endif
