// The block shapes compiled for the block-sparse kernel, as X(R, C) entries.
#pragma once

#define SP_FOR_EACH_BSR_SHAPE(X) X(1, 4) X(4, 1) X(8, 1)
