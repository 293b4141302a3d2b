//! The source side of a copy task as a stream: COPY data, then the source's row count and
//! digest. Read from the source directly (`copy`) or from a source-side agent (`peer`).

use bytes::Bytes;
use futures_util::Stream;

use crate::error::AgentError;

/// Source data as a stream of byte chunks, ending with the source's row count and digest.
pub enum SourceItem {
    /// COPY data.
    Data(Bytes),
    /// Last item: rows the source sent, and their digest when asked for.
    End {
        /// Rows.
        rows: u64,
        /// Digest (verified tasks).
        digest: Option<crate::digest::Digest>,
    },
}

/// A boxed source stream.
pub type SourceStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<SourceItem, AgentError>> + Send>>;
