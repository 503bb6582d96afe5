/* SPDX-License-Identifier: MIT */
/*
 * opt.c - optimizer specs: "sgd lr=0.1 momentum=0.9 wd=1e-4".
 *
 * A spec is a name, then param=value words separated by spaces.  Every value
 * is a finite number; each optimizer takes its own parameters, and an
 * unknown name or parameter, a repeated parameter, a malformed word or a
 * value out of range is refused with a sentence naming the word.  Defaults
 * are MXNet's.  Two specs are the same when they parse to the same
 * parameters (so "lr=0.1" and "lr=1e-1" agree).
 */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvd.h"

struct param {
	const char *name;
	size_t off;  /* in struct opt_params; SIZE_MAX: nesterov */
	double lo, hi;
	bool lo_open, hi_open; /* exclusive bounds */
	unsigned who;          /* bit per optimizer name index */
};

enum { W_SGD = 1, W_ADAM = 2, W_ADAMW = 4, W_ALL = 7 };

#define OFF(f) offsetof(struct opt_params, f)
static const struct param params[] = {
	{ "lr", OFF(lr), 0, INFINITY, false, true, W_ALL },
	{ "wd", OFF(wd), 0, INFINITY, false, true, W_ALL },
	{ "rescale_grad", OFF(rescale_grad), -INFINITY, INFINITY, true, true, W_ALL },
	{ "clip_gradient", OFF(clip_gradient), -INFINITY, INFINITY, true, true, W_ALL },
	{ "momentum", OFF(momentum), 0, 1, false, true, W_SGD },
	{ "nesterov", SIZE_MAX, 0, 1, false, false, W_SGD },
	{ "beta1", OFF(beta1), 0, 1, false, true, W_ADAM | W_ADAMW },
	{ "beta2", OFF(beta2), 0, 1, false, true, W_ADAM | W_ADAMW },
	{ "epsilon", OFF(epsilon), 0, INFINITY, true, true, W_ADAM | W_ADAMW },
};

static const char *const names[] = { "sgd", "adam", "adamw" };

static int bad(char *why, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int bad(char *why, size_t len, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, len, fmt, ap);
	va_end(ap);
	return KV_ERR_INVALID;
}

int opt_parse(const char *spec, size_t len, struct opt_cfg *out, char *why, size_t whylen)
{
	char buf[KV_SPEC_MAX + 1], *save = NULL, *w;
	unsigned who = 0, seen = 0;
	int nesterov = 0;
	struct opt_params p = { 0 };

	if (len == 0 || len > KV_SPEC_MAX)
		return bad(why, whylen, "an optimizer spec is 1 to %u bytes", KV_SPEC_MAX);
	memcpy(buf, spec, len);
	buf[len] = '\0';
	for (size_t i = 0; i < len; i++)
		if (!isprint((unsigned char)buf[i]))
			return bad(why, whylen, "the optimizer spec has a control character");
	w = strtok_r(buf, " ", &save);
	if (!w)
		return bad(why, whylen, "the optimizer spec is empty");
	for (unsigned i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (strcmp(w, names[i]) == 0)
			who = 1u << i;
	if (!who)
		return bad(why, whylen, "unknown optimizer '%s' (sgd, adam or adamw)", w);
	snprintf(out->name, sizeof(out->name), "%s", w);
	/* MXNet's defaults */
	p.rescale_grad = 1;
	p.clip_gradient = -1;
	if (who == W_SGD) {
		p.kind = OPT_SGD;
		p.lr = 0.01f;
	} else {
		p.kind = who == W_ADAM ? OPT_ADAM : OPT_ADAMW;
		p.lr = 0.001f;
		p.beta1 = 0.9f;
		p.beta2 = 0.999f;
		p.epsilon = 1e-8f;
	}
	while ((w = strtok_r(NULL, " ", &save))) {
		char *eq = strchr(w, '='), *end;
		const struct param *q = NULL;
		double v;

		if (!eq || eq == w || !eq[1])
			return bad(why, whylen, "'%s' is not a param=value word", w);
		*eq = '\0';
		for (size_t i = 0; i < sizeof(params) / sizeof(params[0]); i++)
			if (strcmp(w, params[i].name) == 0)
				q = &params[i];
		if (!q || !(q->who & who))
			return bad(why, whylen, "unknown parameter '%s' for %s", w, out->name);
		if (seen & (1u << (q - params)))
			return bad(why, whylen, "'%s=%s' gives parameter '%s' a second time", w, eq + 1,
				   w);
		seen |= 1u << (q - params);
		errno = 0;
		v = strtod(eq + 1, &end);
		if (errno || *end || !isfinite(v))
			return bad(why, whylen, "'%s=%s' is not a finite number", w, eq + 1);
		if ((q->lo_open ? v <= q->lo : v < q->lo) || (q->hi_open ? v >= q->hi : v > q->hi))
			return bad(why, whylen, "'%s=%s' is out of range %c%g, %g%c", w, eq + 1,
				   q->lo_open ? '(' : '[', q->lo, q->hi, q->hi_open ? ')' : ']');
		if (q->off == SIZE_MAX) {
			if (v != 0 && v != 1)
				return bad(why, whylen, "'%s=%s' must be 0 or 1", w, eq + 1);
			nesterov = (int)v;
		} else {
			*(float *)((char *)&p + q->off) = (float)v;
		}
	}
	if (nesterov)
		p.kind = OPT_NAG;
	out->p = p;
	snprintf(out->spec, sizeof(out->spec), "%.*s", (int)len, spec);
	return 0;
}

bool opt_same(const struct opt_cfg *a, const struct opt_cfg *b)
{
	return strcmp(a->name, b->name) == 0 && memcmp(&a->p, &b->p, sizeof(a->p)) == 0;
}

